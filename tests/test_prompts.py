"""The teacher prompt and the extraction of its instruction from well- and ill-formed outputs."""

from __future__ import annotations

import pytest

from montessori.prompts import (ASSISTANT_PREFILL, CLOSE_TAG, OPEN_TAG, extract_instruction, instruction_request,
                                prompt_style)


def test_request_lists_every_example_in_tags():
    examples = [f"Example task number {i}." for i in range(8)]
    text = instruction_request(examples)
    for example in examples:
        assert f"{OPEN_TAG}{example}{CLOSE_TAG}" in text
    assert text.count(OPEN_TAG) == 8 + 2  # the examples and the two mentions in the request


@pytest.mark.parametrize("raw, prefill, expected, how", [
    # the format followed, with and without the prefill
    ("<task>Write a haiku about rain.</task>", "", "Write a haiku about rain.", "tagged"),
    ("Write a haiku about rain.</task>", ASSISTANT_PREFILL, "Write a haiku about rain.", "tagged"),
    # several well-formed tags: the last one wins
    ("<task>First idea.</task> or better <task>Name three rivers in Asia.</task>", "",
     "Name three rivers in Asia.", "tagged"),
    # an opening tag inside an unclosed one: the well-formed inner pair is taken
    ("Fix this. <task>Rewrite the sentence in passive voice.</task> trailing", ASSISTANT_PREFILL,
     "Rewrite the sentence in passive voice.", "tagged"),
    # empty tags are not an instruction; the later unclosed text is
    ("<task> </task><task>Explain photosynthesis simply.", "", "Explain photosynthesis simply.", "unclosed"),
    # truncated at max tokens: unclosed, cut at the blank line
    ("Add up two numbers: 36 and 300 \n\nThe answer would be 336.", ASSISTANT_PREFILL,
     "Add up two numbers: 36 and 300", "unclosed"),
    # the model starts answering on the next line
    ("Question what life would be like in 1800.\nAnswer: hard.", ASSISTANT_PREFILL,
     "Question what life would be like in 1800.", "unclosed"),
    # labels and quotes around the task are removed, the case is kept
    ('<task>Task: "List FIVE uses of iPhone cameras."</task>', "", "List FIVE uses of iPhone cameras.", "tagged"),
    ("\nRewrite the sentence without apostrophes.", ASSISTANT_PREFILL, "Rewrite the sentence without apostrophes.",
     "unclosed"),
    # leading blank lines are not the end of the task
    ("   \n\n Name a color.", ASSISTANT_PREFILL, "Name a color.", "unclosed"),
    # multi-line task with its input inside the tags
    ("<task>Summarize the text.\nText: The cat sat.</task>", "", "Summarize the text.\nText: The cat sat.", "tagged"),
])
def test_extraction_of_well_and_ill_formed_outputs(raw, prefill, expected, how):
    assert extract_instruction(raw, prefill) == (expected, how)


@pytest.mark.parametrize("raw, prefill", [
    ("Sure! Here is a new task for you: write a poem.", ""),   # no tag at all (an API model ignoring the format)
    ("", ASSISTANT_PREFILL),                                    # ended at once
    ("</task>", ASSISTANT_PREFILL),                             # empty pair
    ("<task></task>", ""),
])
def test_extraction_finds_nothing(raw, prefill):
    assert extract_instruction(raw, prefill) == (None, "none")


# --- the rationale style (the original's structure): a reason, then the instruction in tags ---

RATIONALE = prompt_style("rationale")


def test_rationale_request_lists_examples_in_instruction_tags_and_asks_for_a_reason_first():
    examples = ["Name a river.", "Summarize the text. It rained all day."]
    text = instruction_request(examples, RATIONALE)
    for example in examples:
        assert f"<instruction>{example}</instruction>" in text
    assert text.index("why") < text.index("<instruction>the instruction")  # the reason comes first
    assert RATIONALE.prefill == ""  # nothing pre-filled: DPO sees the teacher's whole output
    assert OPEN_TAG not in text


@pytest.mark.parametrize("raw, expected, how", [
    ("Summaries are useful practice, and this one needs its text.\n<instruction>Summarize the paragraph. "
     "Cats sleep a lot.</instruction>", "Summarize the paragraph. Cats sleep a lot.", "tagged"),
    # a rationale that quotes an example first: the last pair is the answer
    ("Unlike <instruction>Name a river.</instruction>, this asks for reasoning.\n"
     "<instruction>Why do rivers meander?</instruction>", "Why do rivers meander?", "tagged"),
    ("It needs an input.\n<instruction>Translate to French. <input>Good morning</input></instruction>",
     "Translate to French. Good morning", "tagged"),
    ("A short reason.\n<instruction>List three prime numbers.", "List three prime numbers.", "unclosed"),
    ("I would ask about rivers.", None, "none"),
    ("<task>Name a river.</task>", None, "none"),  # the other style's tags are not this style's answer
])
def test_rationale_extraction(raw, expected, how):
    assert extract_instruction(raw, "", RATIONALE) == (expected, how)


def test_unknown_prompt_style_names_the_key():
    from montessori.errors import ConfigError

    with pytest.raises(ConfigError, match="synthesis.prompt_style"):
        prompt_style("chatty")
