"""Chat formatting and tokenization shared by generation, SFT, warm-up, influence and DPO.

One function builds the generation prompt and one tokenizes an (instruction, response) pair with
the loss on response tokens only, so every stage sees exactly the same template.
"""

from __future__ import annotations

IGNORE_INDEX = -100

# Stands in for an assistant reply, so that what the template writes after it (the turn's end)
# can be read off the rendered text.
_REPLY_MARKER = "Montessori-reply-marker"


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
        # Templates that rewrite earlier turns (rare): fall back to prompt + response + end of turn.
        return prompt, response + end_of_turn_token(tokenizer)
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


def end_of_turn_text(tokenizer) -> str:
    """What the chat template writes after an assistant reply (e.g. "<|eot_id|>", "<|im_end|>\\n")."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _REPLY_MARKER}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    end = text.rfind(_REPLY_MARKER)
    # A template that drops the reply has no turn end to read: EOS is then the only stop.
    return text[end + len(_REPLY_MARKER):] if end >= 0 else ""


def end_of_turn_token(tokenizer) -> str:
    """The special token the chat template closes an assistant turn with; EOS when it writes none."""
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    for token_id in tokenizer(end_of_turn_text(tokenizer), add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return tokenizer.convert_ids_to_tokens(token_id)
    return tokenizer.eos_token or ""


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: the template's end-of-turn token and EOS. A base model given a
    chat format (Llama-3's <|eot_id|> on Meta-Llama-3-8B, whose EOS is <|end_of_text|>) would
    otherwise keep writing turns until max_new_tokens."""
    turn_end = end_of_turn_token(tokenizer)
    ids = ([tokenizer.convert_tokens_to_ids(turn_end)] if turn_end else []) + [tokenizer.eos_token_id]
    return list(dict.fromkeys(token_id for token_id in ids if token_id is not None))
