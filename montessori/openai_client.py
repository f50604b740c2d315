"""A minimal client for OpenAI-compatible chat endpoints (OpenAI, `vllm serve`, others).

Used by the external teacher and the API judge. The key comes from an environment variable whose
name is a config key, never from the config itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request

from .errors import ConfigError, MontessoriError

log = logging.getLogger(__name__)


class EndpointError(MontessoriError):
    """The endpoint could not be reached or kept failing."""


def api_key(api_key_env: str, config_key: str) -> str:
    key = os.environ.get(api_key_env or "")
    if not key:
        raise ConfigError(
            f"config key '{config_key}' names the environment variable '{api_key_env}' for the API key, "
            f"and it is not set; export it (the key never goes into the config)"
        )
    return key


def chat_completion(base_url: str, model: str, messages: list[dict], *, api_key_env: str, config_key: str,
                    temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 256, n: int = 1,
                    seed: int | None = None, logprobs: bool = False, top_logprobs: int | None = None,
                    timeout: float = 120.0, retries: int = 3) -> dict:
    """POST /chat/completions and return the parsed JSON; retry transient failures with backoff."""
    if not base_url:
        raise ConfigError(f"config key '{config_key}': base_url is not set")
    key = api_key(api_key_env, config_key)
    body = {"model": model, "messages": messages, "temperature": temperature, "top_p": top_p,
            "max_tokens": max_tokens, "n": n}
    if seed is not None:
        body["seed"] = seed
    if logprobs:
        body["logprobs"] = True
        if top_logprobs:
            body["top_logprobs"] = top_logprobs
    url = base_url.rstrip("/") + "/chat/completions"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    last_error = None
    for attempt in range(1, retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read().decode())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            if err.code in (400, 401, 403, 404):
                raise EndpointError(f"{url} (config key '{config_key}') answered HTTP {err.code}: {detail}") from None
            last_error = f"HTTP {err.code}: {detail}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            last_error = str(getattr(err, "reason", err))
        log.warning("%s attempt %d/%d failed: %s", url, attempt, retries, last_error)
        if attempt < retries:
            time.sleep(min(2 ** attempt, 30))
    raise EndpointError(
        f"could not reach {url} (config key '{config_key}') after {retries} attempts: {last_error}"
    )
