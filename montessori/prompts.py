"""The teacher's instruction-writing prompt and the extraction of its answer, in two styles
(config `synthesis.prompt_style`).

`prefill` (the embedded default): the teacher sees example tasks wrapped in <task>...</task> tags
and is asked for one new task in the same tags. Local backends also start the assistant turn with
the opening tag (a prefill): measured on SmolLM2-135M-Instruct, without it the model nearly always
chats *about* the task list; with it, it mostly writes a task. The prefill is part of the recorded
prompt, so the teacher's DPO later trains on exactly what it was given.

`rationale` (the original's structure, used by the paper presets): the teacher first says in a
sentence or two why it proposes its instruction and whether it needs an input to be answerable,
then writes the instruction (with that input) inside <instruction>...</instruction> tags. Nothing
is pre-filled; DPO trains on the whole raw output, rationale included, as the original does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError

OPEN_TAG = "<task>"
CLOSE_TAG = "</task>"
ASSISTANT_PREFILL = OPEN_TAG

# Where an unclosed task ends: a blank line, or a line where the model starts answering it.
_TASK_END = re.compile(r"\n\s*\n|\n\s*(?:answer|output|response|solution|example)s?\b", re.IGNORECASE)
# Labels small models put in front of the task ("Task: ...", "New task - ...").
_LABEL = re.compile(r"^(?:new\s+)?(?:task|instruction)\s*(?:\d+\s*)?[:\-]\s*", re.IGNORECASE)


def _task_request(examples: list[str]) -> str:
    listed = "\n".join(f"{OPEN_TAG}{example}{CLOSE_TAG}" for example in examples)
    return (
        f"Here are some example tasks, each between {OPEN_TAG} and {CLOSE_TAG} tags:\n\n"
        f"{listed}\n\n"
        "Write one new task that is different from all of the examples: a clear instruction a "
        "helpful assistant could carry out with text alone. Reply with only the new task "
        f"between {OPEN_TAG} and {CLOSE_TAG} tags."
    )


def _rationale_request(examples: list[str]) -> str:
    listed = "\n".join(f"<instruction>{example}</instruction>" for example in examples)
    return (
        "Propose one new instruction of the kind people ask an AI assistant: a question or a "
        "request. It will be used to train language models, so make it correct, clear, concise and "
        "useful.\n"
        "First, in one or two sentences, say why you chose this instruction and whether it needs an "
        "input to be answered (for example, a request to summarize needs the text to summarize).\n"
        "Then give the instruction, followed by its input if it needs one, on a single line in this "
        "form:\n<instruction>the instruction, then the input if any</instruction>\n\n"
        f"Some example instructions:\n{listed}\n\n"
        "Write exactly one new instruction, different from all of the examples."
    )


@dataclass(frozen=True)
class PromptStyle:
    name: str
    open_tag: str
    close_tag: str
    prefill: str                              # the start of the assistant turn, on backends that allow it
    request: Callable[[list[str]], str]       # examples -> the user message

    def well_formed(self) -> re.Pattern:
        """A tag pair with no other opening tag inside: the innermost pair of a nested mess."""
        opening, closing = re.escape(self.open_tag), re.escape(self.close_tag)
        return re.compile(opening + r"((?:(?!" + opening + r").)*?)" + closing, re.DOTALL)


PROMPT_STYLES = {
    "prefill": PromptStyle("prefill", OPEN_TAG, CLOSE_TAG, ASSISTANT_PREFILL, _task_request),
    "rationale": PromptStyle("rationale", "<instruction>", "</instruction>", "", _rationale_request),
}


def prompt_style(name: str) -> PromptStyle:
    if name not in PROMPT_STYLES:
        raise ConfigError(f"config key 'synthesis.prompt_style': {name!r} is not one of {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def instruction_request(examples: list[str], style: PromptStyle = PROMPT_STYLES["prefill"]) -> str:
    """The user message asking for one new instruction, with the examples in the style's tags."""
    return style.request(examples)


def extract_instruction(raw_output: str, prefill: str = "",
                        style: PromptStyle = PROMPT_STYLES["prefill"]) -> tuple[str | None, str]:
    """(instruction, how) from the teacher's output; instruction is None when there is none.

    `how` is "tagged" (the last well-formed pair of the style's tags with text in it),
    "unclosed" (no well-formed pair: the text after the last opening tag, up to a closing tag, a
    blank line or a line starting "Answer", "Output", "Response", "Solution" or "Example"; this is
    what a truncated or sloppy small model gives), or "none". The last pair is taken because a
    rationale may quote an example before the answer.
    The prefill is put back in front of the output first, since the model continued it.
    """
    text = prefill + raw_output
    tagged = [match.strip() for match in style.well_formed().findall(text)]
    tagged = [_clean(candidate) for candidate in tagged if candidate]
    tagged = [candidate for candidate in tagged if candidate]
    if tagged:
        return tagged[-1], "tagged"
    start = text.rfind(style.open_tag)
    if start < 0:
        return None, "none"
    tail = text[start + len(style.open_tag):].split(style.close_tag, 1)[0].strip()
    tail = _clean(_TASK_END.split(tail, 1)[0])
    return (tail, "unclosed") if tail else (None, "none")


# The rationale style asks for the input after the instruction; some models tag it <input>.
_INPUT_TAG = re.compile(r"\s*</?input>\s*", re.IGNORECASE)


def _clean(text: str) -> str:
    text = _INPUT_TAG.sub(" ", text).strip()
    text = _LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text
