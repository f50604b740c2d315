"""One generation interface, three backends: transformers (CPU or GPU), vLLM (GPU), an external API.

    generator = make_generator(settings, model_card)
    prompt = generator.chat_prompt(user_text, prefill)        # the exact text the model continues
    outputs = generator.generate(prompts, sampling, n, seed)  # outputs[i] = n completions of prompts[i]

`sampling` = {"temperature", "top_p", "repetition_penalty", "presence_penalty", "max_new_tokens"}
(temperature 0 = greedy). `seed` is one seed per prompt (a list), or one int from which each
prompt's seed is derived by its index in the call. Every backend samples a prompt's completions
from that prompt's seed alone, so the outputs do not depend on how prompts are batched: the
transformers backend draws each sequence's tokens from a torch.Generator of its own (the
`_RowSampler` below, not the global RNG that `model.generate` would share across the batch);
vLLM and the API take a seed per request. On the transformers backend the same prompts, sampling,
n and seeds give the same outputs on the same hardware, whatever the batch size. vLLM's kernels are
not deterministic from one process to the next (its CPU build: token log-probabilities of the same
seeded request up to 0.14 apart, tests/test_vllm.py), so a near-tied token can come out otherwise.

Local backends stop a reply at EOS and at the token the chat template ends an assistant turn
with (`chat.stop_token_ids`): a base model given a chat format has no other way to stop.
"""

from __future__ import annotations

import importlib.util
import logging
from concurrent.futures import ThreadPoolExecutor

from .chat import chat_prompt, stop_token_ids
from .errors import ConfigError, MontessoriError
from .models import load_causal_lm, load_tokenizer, model_path
from .seeding import derive_seed

log = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers")


class Generator:
    """Base class: `chat_prompt` formats, `generate` samples."""

    name = "base"
    supports_prefill = True

    def chat_prompt(self, user_text: str, prefill: str = "") -> str:
        return chat_prompt(self.tokenizer, user_text) + prefill

    def generate(self, prompts: list[str], sampling: dict, n: int, seed: int | list[int]) -> list[list[str]]:
        raise NotImplementedError


def prompt_seeds(seed: int | list[int], count: int) -> list[int]:
    """One seed per prompt: the caller's list, or derived from one seed and each prompt's index."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"{len(seed)} seeds for {count} prompts")
        return [int(value) for value in seed]
    return [derive_seed(seed, "prompt", index) for index in range(count)]


class _RowSampler:
    """A logits processor that samples each row (one sequence: prompt i, completion c at row i*n + c)
    from its own seeded torch.Generator, after temperature and nucleus (top-p) filtering, and hands
    `generate` (run greedy) a row whose only finite logit is the drawn token. A row's tokens then
    depend on its own seed only, not on which other prompts share its batch."""

    def __init__(self, row_seeds: list[int], temperature: float, top_p: float):
        self.row_seeds, self.temperature, self.top_p = row_seeds, temperature, top_p
        self.generators = None

    def __call__(self, input_ids, scores):
        import torch

        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(seed) for seed in self.row_seeds]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep a token while the mass before it is below top_p (so the most likely one always).
            outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= self.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        tokens = torch.stack([torch.multinomial(row, 1, generator=generator)
                              for row, generator in zip(probs, self.generators)])
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter(-1, tokens, 0.0)


class TransformersGenerator(Generator):
    """`model.generate` on batches of left-padded prompts, n samples per prompt."""

    name = "transformers"

    def __init__(self, path: str, batch_size: int = 16, chat_template: str | None = None,
                 dtype: str = "float32", device: str | None = None):
        self.tokenizer = load_tokenizer(path, chat_template)
        self.tokenizer.padding_side = "left"
        self.model = load_causal_lm(path, dtype=dtype, device=device).eval()
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.batch_size = max(1, int(batch_size))
        self._warned_presence = False

    def generate(self, prompts: list[str], sampling: dict, n: int, seed: int | list[int]) -> list[list[str]]:
        seeds = prompt_seeds(seed, len(prompts))
        outputs: list[list[str]] = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            outputs.extend(self._generate_batch(prompts[start:end], sampling, n, seeds[start:end]))
        return outputs

    def _generation_kwargs(self, sampling: dict, n: int, seeds: list[int]) -> dict:
        if sampling.get("presence_penalty") and not self._warned_presence:
            log.warning("transformers backend: presence_penalty has no equivalent and is ignored")
            self._warned_presence = True
        temperature = float(sampling.get("temperature", 1.0))
        kwargs = {
            "max_new_tokens": int(sampling["max_new_tokens"]),
            "repetition_penalty": float(sampling.get("repetition_penalty", 1.0)),
            "pad_token_id": self.tokenizer.pad_token_id,
            # Replaces the model's generation_config EOS, which knows nothing of a template set here.
            "eos_token_id": self.stop_ids,
        }
        if temperature > 0:
            # No top-k cut, as vLLM and the API by default. The sampler draws; generate() keeps its pick.
            row_seeds = [derive_seed(seed, "completion", c) for seed in seeds for c in range(n)]
            sampler = _RowSampler(row_seeds, temperature, float(sampling.get("top_p", 1.0)))
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=[sampler])
        else:
            if n > 1:
                raise ConfigError("greedy decoding (temperature 0) cannot give n > 1 different samples")
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _generate_batch(self, prompts: list[str], sampling: dict, n: int, seeds: list[int]) -> list[list[str]]:
        import torch

        # The chat template already holds the special tokens; a second BOS would change the text.
        # Each prompt n times in a row: row i * n + c is completion c of prompt i, sampled by _RowSampler.
        rows = [prompt for prompt in prompts for _ in range(n)]
        encoded = self.tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = encoded.to(self.model.device)
        with torch.inference_mode():
            sequences = self.model.generate(**encoded, **self._generation_kwargs(sampling, n, seeds))
        new_tokens = sequences[:, encoded["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


class VLLMGenerator(Generator):
    """vLLM's offline `LLM.generate`, one `SamplingParams` (with its own seed) per prompt."""

    name = "vllm"

    def __init__(self, path: str, chat_template: str | None = None, seed: int = 0,
                 gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1):
        from vllm import LLM

        self.tokenizer = load_tokenizer(path, chat_template)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.llm = LLM(model=path, tokenizer=path, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                       tensor_parallel_size=tensor_parallel_size, enforce_eager=vllm_enforce_eager())

    def generate(self, prompts: list[str], sampling: dict, n: int, seed: int | list[int]) -> list[list[str]]:
        from vllm import SamplingParams

        temperature = float(sampling.get("temperature", 1.0))
        params = [
            SamplingParams(
                n=n, temperature=temperature, top_p=float(sampling.get("top_p", 1.0)) if temperature > 0 else 1.0,
                repetition_penalty=float(sampling.get("repetition_penalty", 1.0)),
                presence_penalty=float(sampling.get("presence_penalty", 0.0)),
                max_tokens=int(sampling["max_new_tokens"]), seed=prompt_seed,
                stop_token_ids=self.stop_ids,
            )
            for prompt_seed in prompt_seeds(seed, len(prompts))
        ]
        # Token ids, not text: vLLM would add a BOS in front of a template that already has one.
        inputs = [{"prompt_token_ids": self.tokenizer(prompt, add_special_tokens=False)["input_ids"]}
                  for prompt in prompts]
        results = self.llm.generate(inputs, params, use_tqdm=False)
        return [[choice.text for choice in sorted(result.outputs, key=lambda c: c.index)] for result in results]


class APIGenerator(Generator):
    """An OpenAI-compatible chat endpoint; prompts are user messages (the server applies its template)."""

    name = "api"
    supports_prefill = False

    def __init__(self, base_url: str, model: str, api_key_env: str, config_key: str = "external_teacher",
                 concurrency: int = 8):
        self.base_url, self.model, self.api_key_env = base_url, model, api_key_env
        self.config_key = config_key
        self.concurrency = max(1, int(concurrency))

    def chat_prompt(self, user_text: str, prefill: str = "") -> str:
        return user_text

    def generate(self, prompts: list[str], sampling: dict, n: int, seed: int | list[int]) -> list[list[str]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            seeds = prompt_seeds(seed, len(prompts))
            return list(pool.map(lambda prompt, prompt_seed: self._complete(prompt, sampling, n, prompt_seed),
                                 prompts, seeds))

    def _complete(self, prompt: str, sampling: dict, n: int, seed: int) -> list[str]:
        from .openai_client import chat_completion

        texts: list[str] = []
        # Some servers ignore `n` and return one choice: ask again for the rest.
        while len(texts) < n:
            reply = chat_completion(
                self.base_url, self.model, [{"role": "user", "content": prompt}],
                api_key_env=self.api_key_env, config_key=self.config_key,
                temperature=float(sampling.get("temperature", 1.0)), top_p=float(sampling.get("top_p", 1.0)),
                max_tokens=int(sampling["max_new_tokens"]), n=n - len(texts), seed=derive_seed(seed, len(texts)),
            )
            choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
            if not choices:
                raise MontessoriError(f"{self.base_url} (config key '{self.config_key}') returned no choices: {reply}")
            texts.extend((choice.get("message") or {}).get("content") or "" for choice in choices)
        return texts[:n]


def vllm_enforce_eager() -> bool:
    """True without a GPU (vLLM's CPU build): on 2 cores its torch.compile warm-up took about 3 minutes
    for SmolLM2-135M and eager loading 20 s (issue 10's trial), more than compilation wins back there.
    On a GPU, CUDA graphs pay for themselves, so vLLM keeps its default there."""
    import torch

    return not torch.cuda.is_available()


def vllm_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def make_generator(settings: dict, model_card: str) -> Generator:
    """The backend for a stage: the external teacher when configured, else `backend` (auto|vllm|transformers).

    Settings read: backend ("auto"), batch_size (16), seed (0), chat_template (None),
    external_teacher (None or {base_url, model, api_key_env}), api_concurrency (8),
    gpu_memory_utilization (0.9).
    """
    external = settings.get("external_teacher")
    if external:
        for key in ("base_url", "model"):
            if not external.get(key):
                raise ConfigError(f"config key 'external_teacher.{key}' must be set to use the external teacher")
        log.info("generation backend: API %s at %s", external["model"], external["base_url"])
        return APIGenerator(external["base_url"], external["model"], external.get("api_key_env") or "OPENAI_API_KEY",
                            concurrency=settings.get("api_concurrency", 8))
    backend = settings.get("backend", "auto")
    if backend not in BACKENDS:
        raise ConfigError(f"config key 'backend': {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "vllm" if vllm_available() else "transformers"
    path = model_path(model_card)
    log.info("generation backend: %s, model %s", backend, path)
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("config key 'backend' is 'vllm' but vllm is not installed (pip install '.[vllm]')")
        return VLLMGenerator(path, settings.get("chat_template"), seed=int(settings.get("seed", 0)),
                             gpu_memory_utilization=float(settings.get("gpu_memory_utilization", 0.9)))
    return TransformersGenerator(path, batch_size=settings.get("batch_size", 16),
                                 chat_template=settings.get("chat_template"))
