"""The teacher's instruction-writing prompt and the extraction of its answer.

The teacher sees example tasks wrapped in <task>...</task> tags and is asked for one new task in
the same tags. Local backends also start the assistant turn with the opening tag (a prefill):
measured on SmolLM2-135M-Instruct, without it the model nearly always chats *about* the task
list; with it, it mostly writes a task. The prefill is part of the recorded prompt, so the
teacher's DPO later trains on exactly what it was given.
"""

from __future__ import annotations

import re

OPEN_TAG = "<task>"
CLOSE_TAG = "</task>"
ASSISTANT_PREFILL = OPEN_TAG

_WELL_FORMED = re.compile(re.escape(OPEN_TAG) + r"((?:(?!" + re.escape(OPEN_TAG) + r").)*?)" + re.escape(CLOSE_TAG),
                          re.DOTALL)
# Where an unclosed task ends: a blank line, or a line where the model starts answering it.
_TASK_END = re.compile(r"\n\s*\n|\n\s*(?:answer|output|response|solution|example)s?\b", re.IGNORECASE)
# Labels small models put in front of the task ("Task: ...", "New task - ...").
_LABEL = re.compile(r"^(?:new\s+)?(?:task|instruction)\s*(?:\d+\s*)?[:\-]\s*", re.IGNORECASE)


def instruction_request(examples: list[str]) -> str:
    """The user message asking for one new task, with the examples in tags."""
    listed = "\n".join(f"{OPEN_TAG}{example}{CLOSE_TAG}" for example in examples)
    return (
        f"Here are some example tasks, each between {OPEN_TAG} and {CLOSE_TAG} tags:\n\n"
        f"{listed}\n\n"
        "Write one new task that is different from all of the examples: a clear instruction a "
        "helpful assistant could carry out with text alone. Reply with only the new task "
        f"between {OPEN_TAG} and {CLOSE_TAG} tags."
    )


def extract_instruction(raw_output: str, prefill: str = "") -> tuple[str | None, str]:
    """(instruction, how) from the teacher's output; instruction is None when there is none.

    `how` is "tagged" (the last well-formed <task>...</task> pair with text in it),
    "unclosed" (no well-formed pair: the text after the last opening tag, up to a closing tag, a
    blank line or a line starting "Answer", "Output", "Response", "Solution" or "Example"; this is
    what a truncated or sloppy small model gives), or "none".
    The prefill is put back in front of the output first, since the model continued it.
    """
    text = prefill + raw_output
    tagged = [match.strip() for match in _WELL_FORMED.findall(text)]
    tagged = [_clean(candidate) for candidate in tagged if candidate]
    tagged = [candidate for candidate in tagged if candidate]
    if tagged:
        return tagged[-1], "tagged"
    start = text.rfind(OPEN_TAG)
    if start < 0:
        return None, "none"
    tail = text[start + len(OPEN_TAG):].split(CLOSE_TAG, 1)[0].strip()
    tail = _clean(_TASK_END.split(tail, 1)[0])
    return (tail, "unclosed") if tail else (None, "none")


def _clean(text: str) -> str:
    text = _LABEL.sub("", text.strip(), count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text
