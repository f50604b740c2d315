"""Chat formatting and tokenization shared by generation, SFT, warm-up, influence and DPO.

One function builds the generation prompt and one tokenizes an (instruction, response) pair with
the loss on response tokens only, so every stage sees exactly the same template.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def chat_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """The exact text a chat model is given to answer `user_text` (generation prompt included)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_completion_text(tokenizer, user_text: str, response: str, system: str | None = None) -> tuple[str, str]:
    """(prompt, completion) strings whose concatenation is the templated two-turn conversation."""
    prompt = chat_prompt(tokenizer, user_text, system)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": response}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        # Templates that rewrite earlier turns (rare): fall back to prompt + response + eos.
        return prompt, response + (tokenizer.eos_token or "")
    return prompt, full[len(prompt):]


def encode_pair(tokenizer, user_text: str, response: str, max_length: int = 1024,
                system: str | None = None) -> dict:
    """input_ids and labels (prompt tokens masked with -100), truncated to `max_length`."""
    prompt, completion = chat_completion_text(tokenizer, user_text, response, system)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}
