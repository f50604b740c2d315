"""OpenAI-compatible chat endpoints (OpenAI, `vllm serve`, others) through the official `openai` client.

Used by the external teacher and the API judges. The client retries what is worth retrying,
with exponential backoff: HTTP 408/409/429 (honouring the server's `Retry-After` up to two
minutes), every 5xx, timeouts and dropped connections. Any other HTTP error is final at once.
The key comes from an environment variable whose name is a config key, never from the config
itself, and it is scrubbed from every error message (a server may echo the request back).
"""

from __future__ import annotations

import functools
import logging
import os

from .errors import ConfigError, MontessoriError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RETRIES = 5


class EndpointError(MontessoriError):
    """The endpoint could not be reached, kept failing, or refused the request."""


def api_key(api_key_env: str, config_key: str) -> str:
    key = os.environ.get(api_key_env or "")
    if not key:
        raise ConfigError(
            f"config key '{config_key}' names the environment variable '{api_key_env}' for the API key, "
            f"and it is not set; export it (the key never goes into the config)"
        )
    return key


@functools.lru_cache(maxsize=16)
def _client(base_url: str, key: str, timeout: float, retries: int):
    """One client (and its connection pool) per endpoint, shared by a stage's threads."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=retries)


def _scrub(text: str, key: str) -> str:
    return text.replace(key, "***") if key else text


def chat_completion(base_url: str, model: str, messages: list[dict], *, api_key_env: str, config_key: str,
                    temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 256, n: int = 1,
                    seed: int | None = None, logprobs: bool = False, top_logprobs: int | None = None,
                    timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES) -> dict:
    """POST /chat/completions and return the response as a plain dict (the API's JSON fields).

    `timeout` bounds each attempt, `retries` counts the attempts after the first, so a server
    that never answers fails after about (retries + 1) x timeout seconds plus the backoff.
    """
    import openai

    if not base_url:
        raise ConfigError(f"config key '{config_key}': base_url is not set")
    key = api_key(api_key_env, config_key)
    request = {"model": model, "messages": messages, "temperature": temperature, "top_p": top_p,
               "max_tokens": max_tokens, "n": n}
    if seed is not None:
        request["seed"] = seed
    if logprobs:
        request["logprobs"] = True
        if top_logprobs:
            request["top_logprobs"] = top_logprobs
    client = _client(base_url.rstrip("/"), key, float(timeout), int(retries))
    where = f"{base_url.rstrip('/')}/chat/completions (config key '{config_key}')"
    try:
        response = client.chat.completions.create(**request)
    except openai.APITimeoutError:
        raise EndpointError(f"{where} did not answer within {timeout} s, {retries + 1} attempts") from None
    except openai.APIConnectionError as err:
        raise EndpointError(f"could not reach {where} after {retries + 1} attempts: "
                            f"{_scrub(str(err.__cause__ or err), key)}") from None
    except openai.APIStatusError as err:
        retried = err.status_code in (408, 409, 429) or err.status_code >= 500
        attempts = f" after {retries + 1} attempts" if retried else ""
        raise EndpointError(f"{where} answered HTTP {err.status_code}{attempts}: "
                            f"{_scrub(str(err.message), key)[:500]}") from None
    return response.model_dump(exclude_unset=False)
