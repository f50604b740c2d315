"""Host-memory requests of the model jobs, from the model's size instead of fixed 32/64 GB.

A model is described by its config-sized shape (no weights): hidden size, layers, vocabulary,
MLP width, attention heads, tied embeddings. `ModelShape.parameters()` counts a Llama-style
decoder's parameters from it; `job_memory_mb` turns that into what one job holds in host memory
at its peak (docs/cluster.md, "Memory requests", has the arithmetic and the 8B figures).

Where the shape comes from, and why: the Snakefile is parsed at planning time, before the
`prepare_model` jobs have downloaded anything, and again inside every cluster job, often on nodes
without internet. So the shape is never fetched from the hub. It is read from `config.json` of a
local model directory, else taken from `KNOWN_SHAPES` (the models the presets and the embedded
default name, copied from their config.json), else from the Hugging Face cache when the model was
downloaded on the login node (docs/cluster.md tells users to do that for offline compute nodes).
A model found nowhere is a clear error naming its config key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

# Snakemake's mem_mb is in decimal megabytes (it shows mem_mb=8000 as 8 GB); so are these.
MB = 10 ** 6
FP32_BYTES = 4
# Host memory one training or scoring process holds besides model state: the Python interpreter
# with torch, transformers and the CUDA context, the tokenizer and the dataset. Assumed, not
# measured: no GPU machine was available to measure a CUDA process's resident set.
PROCESS_OVERHEAD_MB = 6000


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    @classmethod
    def from_config(cls, config: dict, source: str) -> "ModelShape":
        """From a transformers config.json (Llama, Mistral, Qwen2-style decoders)."""
        try:
            heads = int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or 0) or None
            if head_dim == int(config["hidden_size"]) // heads:
                head_dim = None           # the default: one description per model, however written
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=int(config["hidden_size"]),
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                head_dim=head_dim,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{source}: not a decoder config this pipeline can size ({err!r})") from None

    @property
    def _head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def _matrices(self) -> dict[str, int]:
        """Element counts of one of each weight matrix."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self._head_dim, self.num_key_value_heads * self._head_dim
        return {
            "embed_tokens": self.vocab_size * h,
            "q_proj": h * q, "k_proj": h * kv, "v_proj": h * kv, "o_proj": q * h,
            "gate_proj": h * self.intermediate_size, "up_proj": h * self.intermediate_size,
            "down_proj": self.intermediate_size * h,
        }

    def parameters(self) -> int:
        """Embedding, per layer attention + gated MLP + two RMSNorm vectors, final norm, and the
        output head unless it shares the embedding's weight (no biases)."""
        m = self._matrices()
        layer = sum(value for key, value in m.items() if key != "embed_tokens") + 2 * self.hidden_size
        head = 0 if self.tie_word_embeddings else m["embed_tokens"]
        return m["embed_tokens"] + self.num_hidden_layers * layer + self.hidden_size + head

    def largest_tensor(self) -> int:
        """Elements of the largest single parameter (the embedding for every model we run)."""
        return max(self._matrices().values())


_LLAMA3_8B = ModelShape(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8)
KNOWN_SHAPES: dict[str, ModelShape] = {
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "TinyLlama/TinyLlama_v1.1": ModelShape(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    # The transfer students of presets/transfer.yaml (their config.json; Qwen1.5's q/k/v biases and
    # Gemma-2's two extra norms per layer are left out: well under 0.1% of their parameters).
    "mistralai/Mistral-7B-v0.1": ModelShape(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "Qwen/Qwen1.5-7B": ModelShape(vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32),
    "google/gemma-2-9b": ModelShape(vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                    num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True,
                                    head_dim=256),
    "smollm2-135m-instruct": ModelShape(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        tie_word_embeddings=True),
}


def _cached_hub_config(name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(name, "config.json")
    return Path(found) if isinstance(found, str) else None


def model_shape(model: str, key: str) -> ModelShape:
    """The shape of the model a config key (`models.student`) names; never touches the network."""
    local = Path(model) / "config.json"
    if local.is_file():
        return ModelShape.from_config(json.loads(local.read_text()), str(local))
    if model in KNOWN_SHAPES:
        return KNOWN_SHAPES[model]
    cached = _cached_hub_config(model)
    if cached is not None:
        return ModelShape.from_config(json.loads(cached.read_text()), str(cached))
    raise ConfigError(
        f"config key '{key}': cannot size the memory of {model!r} without its config.json: it is not a "
        f"local directory, not one of {sorted(KNOWN_SHAPES)}, and not in the Hugging Face cache. Download it "
        f"on the login node first (`huggingface-cli download {model} config.json`), or give a local directory."
    )


def _whole_gb_in_mb(nbytes: float) -> int:
    """A request in MB (Snakemake's mem_mb), rounded up to whole GB."""
    return math.ceil(nbytes / MB / 1000) * 1000


def job_memory_mb(kind: str, shape: ModelShape, processes: int = 1, checkpoints: bool = False) -> int:
    """Peak host memory of one job, in MB (rounded up to whole GB).

    kind:
      influence  the warm-up state is loaded tensor by tensor straight to its GPU: at most one
                 parameter's two fp32 AdamW moments pass through host memory at a time.
      warmup     FSDP FULL_STATE_DICT: rank 0 gathers the fp32 weights (4 B/param) and the fp32
                 AdamW moments (8 B/param) it writes for influence scoring.
      sft        the fp32 weights gathered on rank 0; plus the moments when the trainer writes
                 resumable checkpoints (`checkpoints`: sft.save_steps set).
      dpo        rank 0 loads the policy and the reference model, both fp32 (8 B/param); a
                 checkpoint (dpo.save_steps) gathers weights and moments (12 B/param) instead.
      nll        the evaluated student loaded in fp32 on the host (4 B/param) before it moves
                 to its GPU.
    Every process (one per GPU of a training job) adds PROCESS_OVERHEAD_MB.
    """
    if processes < 1:
        raise ConfigError(f"a job runs at least one process, got {processes}")
    params = shape.parameters()
    weights, moments = FP32_BYTES * params, 2 * FP32_BYTES * params
    if kind == "influence":
        state = 2 * FP32_BYTES * shape.largest_tensor()
    elif kind == "warmup":
        state = weights + moments
    elif kind == "sft":
        state = weights + (moments if checkpoints else 0)
    elif kind == "dpo":
        state = max(2 * weights, weights + moments if checkpoints else 0)
    elif kind == "nll":
        state = weights
    else:
        raise ValueError(f"job_memory_mb: unknown job kind {kind!r}")
    return _whole_gb_in_mb(state + processes * PROCESS_OVERHEAD_MB * MB)


def rule_memory_mb(kind: str, config: dict, student: str | None = None, student_key: str | None = None) -> int:
    """job_memory_mb for a rule of the pipeline, from its validated config: the student for
    warm-up, influence, SFT and the NLL, the teacher for DPO; training jobs run one process per GPU.
    `student` (named by the config key `student_key`) replaces models.student: a transfer student."""
    role = "teacher" if kind == "dpo" else "student"
    if student is not None and role == "student":
        shape = model_shape(student, student_key)
    else:
        shape = model_shape(config["models"][role], f"models.{role}")
    training_gpus = (config["dpo"]["gpus"] or config["compute"]["training_gpus"]) if kind == "dpo" \
        else config["compute"]["training_gpus"]
    processes = max(1, training_gpus) if kind not in ("influence", "nll") else 1
    checkpoints = bool(config.get(kind, {}).get("save_steps")) if kind in ("sft", "dpo") else False
    return job_memory_mb(kind, shape, processes=processes, checkpoints=checkpoints)
