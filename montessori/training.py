"""Student SFT (warm-up and final student) and teacher DPO with TRL, resumable, fp32 state.

One SFT path serves the warm-up and the final student: examples are tokenized by
`chat.encode_pair` (loss on response tokens only, exactly as the influence stage scores them)
and handed to TRL's `SFTTrainer` pre-tokenized, so TRL neither re-templates nor re-masks them.
Weights and AdamW state stay fp32 (on a GPU bf16 autocast only): a 5e-6 step in bf16 rounds
away for most weights. The lr schedule is ours (`schedules.py`), not transformers' WSD.

Resume: the trainer checkpoints into `out_dir/checkpoint-N` every `save_steps`; a rerun picks
the last *complete* one (the trainer writes `trainer_state.json` last). `out_dir/run.json` holds
a fingerprint of settings, inputs and model: checkpoints from other settings are never resumed.
`out_dir/training_complete.json` (after the final model is saved) lets a run killed between the
final save and the `done` card finish without training again.

Several processes (`accelerate launch`, DDP or FSDP: see rules/common.smk `training_launcher`)
all run the same stage function. Rank 0 alone claims `out_dir` and tells the others what it
decided, and alone writes files and cards; saving the model and the optimizer state are
collectives every rank enters (under FSDP each holds only a shard), and every rank waits until
the model is completely saved before the card announces it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from .chat import IGNORE_INDEX, encode_pair, end_of_turn_token
from .errors import ConfigError, DataError, ModelError, MontessoriError
from .io import atomic_path, read_json, read_jsonl, write_json_atomic
from .models import load_causal_lm, load_tokenizer, model_path, write_model_card
from .schedules import make_scheduler
from .seeding import derive_seed

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
COMPLETE_FILE = "training_complete.json"
CHECKPOINT_PREFIX = "checkpoint-"


# --- processes ------------------------------------------------------------------------------

def _world_size() -> int:
    # Set by accelerate launch / torchrun for every process they start; absent for a plain run.
    return int(os.environ.get("WORLD_SIZE", "1"))


def _process_state():
    """accelerate's process state (it joins the process group) under a launch of several
    processes; None for one process, which then never touches torch.distributed."""
    if _world_size() == 1:
        return None
    from accelerate import PartialState

    # The device choice the trainer makes (`_mixed_precision`): gloo between CPU processes.
    return PartialState(cpu=_mixed_precision()["use_cpu"])


def _is_main_process() -> bool:
    state = _process_state()
    return state is None or state.is_main_process


def _wait_for_everyone() -> None:
    state = _process_state()
    if state is not None:
        state.wait_for_everyone()


# --- settings -------------------------------------------------------------------------------

def _positive_int(settings: dict, key: str, section: str, default=None) -> int:
    value = settings.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config key '{section}.{key}' must be a positive integer, got {value!r}")
    return value


def _accumulation_steps(settings: dict, section: str) -> int:
    """Gradient accumulation so that batch_size x accumulation x processes = effective_batch."""
    batch_size = _positive_int(settings, "batch_size", section)
    effective = _positive_int(settings, "effective_batch", section, batch_size)
    processes = _world_size()
    per_step = batch_size * processes
    if effective % per_step:
        raise ConfigError(
            f"config key '{section}.effective_batch' ({effective}) must be a multiple of "
            f"'{section}.batch_size' ({batch_size}) x processes ({processes})"
        )
    return effective // per_step


def _mixed_precision() -> dict:
    import torch

    # Autocast only: the weights and AdamW moments the trainer keeps stay fp32.
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": False, "use_cpu": not torch.cuda.is_available()}


# config `logging.report_to` -> the packages transformers' callback for it can use (any one).
REPORTING_PACKAGES = {"none": (), "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def _installed(packages: tuple[str, ...]) -> bool:
    return any(importlib.util.find_spec(package) is not None for package in packages)


def _report_to(settings: dict) -> str:
    """Where the trainer also sends its logs (config `logging.report_to`, a runtime setting: the
    loss records and models do not depend on it). Optional packages, never needed offline: a
    missing one is named with the key before any model is loaded."""
    report_to = settings.get("logging", {}).get("report_to", "none")
    if report_to not in REPORTING_PACKAGES:
        raise ConfigError(f"config key 'logging.report_to' must be one of {', '.join(REPORTING_PACKAGES)}, "
                          f"got {report_to!r}")
    packages = REPORTING_PACKAGES[report_to]
    if packages and not _installed(packages):
        raise ConfigError(f"config key 'logging.report_to' is {report_to}, but {' or '.join(packages)} is not "
                          f"installed in the training environment: install it, or set the key to none")
    return report_to


def _trainer_args(settings: dict, section: str, out_dir: Path, seed: int) -> dict:
    save_steps = settings.get("save_steps")
    if save_steps is not None:
        save_steps = _positive_int(settings, "save_steps", section)
    epochs = settings.get("epochs", 1)
    if not isinstance(epochs, (int, float)) or epochs <= 0:
        raise ConfigError(f"config key '{section}.epochs' must be > 0, got {epochs!r}")
    lr = settings.get("lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"config key '{section}.lr' must be a number > 0, got {lr!r}")
    return {
        "output_dir": str(out_dir),
        "learning_rate": float(lr),
        "num_train_epochs": float(epochs),
        "per_device_train_batch_size": _positive_int(settings, "batch_size", section),
        "gradient_accumulation_steps": _accumulation_steps(settings, section),
        "max_length": _positive_int(settings, "max_length", section, 1024),
        "weight_decay": float(settings.get("weight_decay", 0.0)),
        "optim": "adamw_torch",
        "logging_steps": 1,
        "save_strategy": "steps" if save_steps else "no",
        "save_steps": save_steps or 500,
        "save_total_limit": 2,
        # tensorboard writes under out_dir/runs/
        "report_to": _report_to(settings),
        "seed": seed,
        "dataloader_num_workers": 0,
        **_mixed_precision(),
    }


# --- resume bookkeeping ---------------------------------------------------------------------

def _file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_identity(model: str) -> list:
    """A local model's files by size and mtime: a model retrained in place is a different model."""
    directory = Path(model)
    if not directory.is_dir():
        return [model]
    files = sorted(p for p in directory.iterdir() if p.is_file() and (
        p.suffix in {".safetensors", ".bin", ".pt"} or p.name == "config.json"))
    return [str(directory.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


# Runtime settings the CLI merges in (montessori/runtime.py): they do not change the training, so
# checkpoints written under other values are resumed.
RUNTIME_SECTIONS = ("logging",)


def _fingerprint(stage: str, settings: dict, model: str, data: str | os.PathLike) -> str:
    result_settings = {key: value for key, value in settings.items() if key not in RUNTIME_SECTIONS}
    text = json.dumps({"stage": stage, "settings": result_settings, "model": _model_identity(model),
                       "data": _file_digest(data)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _checkpoints(out_dir: Path) -> list[Path]:
    found = [p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _claim_out_dir(out_dir: Path, fingerprint: str) -> str | None:
    """Make `out_dir` this run's; return the checkpoint to resume from, or `"complete"`, or None."""
    run_file = out_dir / RUN_FILE
    if out_dir.exists() and any(out_dir.iterdir()):
        if not run_file.exists():
            raise DataError(f"{out_dir}: exists, is not empty and was not written by a training stage "
                            f"(no {RUN_FILE}); remove it or choose another output")
        if read_json(run_file).get("fingerprint") != fingerprint:
            log.warning("%s: settings, data or model changed since its checkpoints were written: starting over",
                        out_dir)
            shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not run_file.exists():
        write_json_atomic(run_file, {"fingerprint": fingerprint})
        return None
    if (out_dir / COMPLETE_FILE).exists():
        return "complete"
    for checkpoint in reversed(_checkpoints(out_dir)):
        if (checkpoint / "trainer_state.json").exists():
            return str(checkpoint)
        log.warning("%s: incomplete checkpoint (killed while saving), removing it", checkpoint)
        shutil.rmtree(checkpoint)
    return None


def _claim_out_dir_once(out_dir: Path, fingerprint: str) -> str | None:
    """`_claim_out_dir` decided by rank 0 alone (it may delete stale checkpoints), its answer or
    error passed to every rank, so that all resume from the same checkpoint or all stop."""
    state = _process_state()
    if state is None:
        return _claim_out_dir(out_dir, fingerprint)
    from accelerate.utils import broadcast_object_list

    if not state.is_main_process:
        # Every rank runs the same steps: one copy of the stage's log is enough.
        log.setLevel(logging.WARNING)
    decision = [None, None]
    if state.is_main_process:
        try:
            decision[0] = _claim_out_dir(out_dir, fingerprint)
        except MontessoriError as err:
            decision[1] = err
    broadcast_object_list(decision)
    if decision[1] is not None:
        raise decision[1]
    return decision[0]


def _finish_out_dir(out_dir: Path, record: dict) -> None:
    write_json_atomic(out_dir / COMPLETE_FILE, record)
    for checkpoint in _checkpoints(out_dir):
        shutil.rmtree(checkpoint)


# --- loss curve -----------------------------------------------------------------------------

def _loss_history(log_history: list[dict]) -> list[dict]:
    keep = ("step", "epoch", "loss", "learning_rate", "grad_norm",
            "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
    return [{k: entry[k] for k in keep if k in entry} for entry in log_history if "loss" in entry]


def write_loss_curve(record: dict, loss_json: str, loss_png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json_atomic(loss_json, record)
    history = record["history"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if history and "learning_rate" in history[0]:
        lr_ax = ax.twinx()
        lr_ax.plot([h["step"] for h in history], [h["learning_rate"] for h in history],
                   color="tab:gray", alpha=0.5, linewidth=1)
        lr_ax.set_ylabel("learning rate", color="tab:gray")
    fig.tight_layout()
    with atomic_path(loss_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# --- trainers -------------------------------------------------------------------------------

def _scheduled(trainer_cls):
    """`trainer_cls` with our lr schedule (the trainer's own step count decides the phases)."""

    class Scheduled(trainer_cls):
        def __init__(self, *args, lr_schedule, schedule_key: str, **kwargs):
            self._lr_schedule = lr_schedule
            self._schedule_key = schedule_key
            super().__init__(*args, **kwargs)

        # `create_scheduler` is the Trainer's documented override point. Its own version also sets a
        # private flag that makes a second train() call rebuild the scheduler; every trainer here
        # runs train() once (a resume is a new process and a new trainer), so none is needed.
        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = make_scheduler(optimizer or self.optimizer, self._lr_schedule,
                                                   num_training_steps, self._schedule_key)
            return self.lr_scheduler

    Scheduled.__name__ = Scheduled.__qualname__ = f"Scheduled{trainer_cls.__name__}"
    return Scheduled


def _check_full_state_dict(trainer) -> None:
    """Under FSDP the trainer saves a loadable model only from a FULL_STATE_DICT: with sharded
    state dicts `save_model` writes nothing, and the done card would announce no model."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        raise ConfigError(
            f"config key 'compute.accelerate_config': FSDP must save FULL_STATE_DICT "
            f"(fsdp_state_dict_type), got {plugin.state_dict_type}"
        )


def _run(trainer, resume: str | None, stage: str, section: str) -> dict:
    _check_full_state_dict(trainer)
    started_step = 0
    if resume:
        started_step = read_json(Path(resume) / "trainer_state.json")["global_step"]
        log.info("%s: resuming from %s (step %d)", stage, resume, started_step)
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - started
    steps = trainer.state.global_step
    log.info("%s: trained %d steps (%d in this run) in %.1f s", stage, steps, steps - started_step, seconds)
    history = _loss_history(trainer.state.log_history)
    if not all(math.isfinite(h["loss"]) for h in history):
        raise ModelError(f"{stage}: non-finite training loss in {trainer.args.output_dir}; lower '{section}.lr'")
    return {
        "stage": stage,
        "steps": steps,
        "resumed_from_step": started_step,
        "seconds_this_run": round(seconds, 3),
        "seconds_per_step": round(seconds / max(1, steps - started_step), 4),
        "history": history,
    }


def _tokenizer_with_template(path: str, chat_template: str | None):
    """The model's own chat template; the configured one only where the model has none."""
    try:
        return load_tokenizer(path)
    except ModelError:
        if not chat_template:
            raise
    log.info("model %s has no chat template: using config key models.chat_template", path)
    return load_tokenizer(path, chat_template)


# --- SFT ------------------------------------------------------------------------------------

def sft_examples(data: str | os.PathLike, tokenizer, max_length: int, section: str = "sft") -> list[dict]:
    """encode_pair for every record; records left with no response token after truncation are dropped."""
    records = read_jsonl(data)
    if not records:
        raise DataError(f"{data}: no training records")
    examples, dropped = [], []
    for number, record in enumerate(records, start=1):
        for key in ("instruction", "response"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{data}: record {number} (id {record.get('id')!r}) has no string '{key}'")
        encoded = encode_pair(tokenizer, record["instruction"], record["response"], max_length)
        if all(label == IGNORE_INDEX for label in encoded["labels"]):
            dropped.append(record.get("id", number))
            continue
        examples.append(encoded)
    if dropped:
        log.warning("%s: %d records have no response token within max_length=%d and are skipped, e.g. %s",
                    data, len(dropped), max_length, dropped[:3])
    if not examples:
        raise DataError(f"{data}: every record's prompt fills max_length={max_length}; raise '{section}.max_length'")
    return examples


def build_sft_trainer(stage: str, section: str, settings: dict, model_dir: str, tokenizer, data: str,
                      out_dir: Path, default_schedule, encode=sft_examples):
    """TRL SFTTrainer on `encode(data, tokenizer, max_length, section)` examples (by default
    `encode_pair` of instruction/response records) with our schedule; fp32 weights and AdamW state."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    seed = derive_seed(settings.get("seed", 0), stage)
    args = SFTConfig(**_trainer_args(settings, section, out_dir, seed), dataset_num_proc=None)
    examples = encode(data, tokenizer, args.max_length, section)
    schedule = settings.get("schedule", default_schedule)
    log.info("%s: %d examples, batch %d x %d accumulation, lr %g, schedule %s", stage, len(examples),
             args.per_device_train_batch_size, args.gradient_accumulation_steps, args.learning_rate, schedule)
    return _scheduled(SFTTrainer)(
        model=load_causal_lm(model_dir, "float32", "cpu"), args=args, train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer, lr_schedule=schedule, schedule_key=f"{section}.schedule",
    )


def _train_once(stage: str, section: str, out_dir: Path, fingerprint: str, make_trainer, finish=None) -> dict:
    """Train (or resume, or find finished) one run into `out_dir`, save its weights and mark it
    complete; returns its record. `finish(trainer, record)`: what the stage saves beside the
    weights (and adds to the record) before the run is marked complete."""
    resume = _claim_out_dir_once(out_dir, fingerprint)
    if resume == "complete":
        log.info("%s: %s already holds the trained model", stage, out_dir)
        return read_json(out_dir / COMPLETE_FILE)
    trainer = make_trainer()
    record = _run(trainer, resume, stage, section)
    _save_model(trainer, out_dir)
    if finish is not None:
        finish(trainer, record)
    if _is_main_process():
        _finish_out_dir(out_dir, record)
    return record


def _sft(stage: str, section: str, settings: dict, student: str, data: str, out_dir: Path, default_schedule,
         finish=None, encode=None) -> dict:
    """One SFT run of `student` on `data` (_train_once); returns its record."""
    path = model_path(student)

    def make_trainer():
        tokenizer = _tokenizer_with_template(path, settings.get("chat_template"))
        return build_sft_trainer(stage, section, settings, path, tokenizer, data, out_dir, default_schedule,
                                 encode=encode or sft_examples)

    return _train_once(stage, section, out_dir, _fingerprint(stage, settings, path, data), make_trainer, finish)


def _save_model(trainer, out_dir: Path) -> None:
    """The trained weights and the tokenizer (the trainer's processing class), from every rank:
    under FSDP the trainer gathers the FULL_STATE_DICT (envs/accelerate_fsdp.yaml) from all of
    them, and rank 0 writes it."""
    import torch

    if any(p.dtype != torch.float32 for p in trainer.model.parameters()):
        raise ModelError(f"{out_dir}: refusing to save non-fp32 weights")
    trainer.save_model(str(out_dir))


def _announce(done: str, out_dir: Path, stage: str, steps: int) -> None:
    """The done card, written by rank 0 once every rank is past saving what it announces."""
    _wait_for_everyone()
    if _is_main_process():
        write_model_card(done, out_dir, stage=stage, steps=steps)


def warmup(settings: dict, student: str, data: str, out_dir: str, done: str) -> None:
    """Stage `warmup`: settings = config `warmup` + seed + chat_template.

    Saves the fp32 student, its tokenizer and `optimizer_state.safetensors` (AdamW moments, step and the
    lr in force at the end) into `out_dir`, then the `done` card.
    """
    from .optim_state import save_adamw_state

    out_dir = Path(out_dir)

    def save_optimizer_state(trainer, record: dict) -> None:
        lr_at_end = trainer.lr_scheduler.get_last_lr()[0]
        save_adamw_state(trainer.model_wrapped, trainer.optimizer, lr_at_end, out_dir)
        record["lr_at_end"] = lr_at_end
        log.info("warmup: %d steps, final loss %s, lr in force at the end %g", record["steps"],
                 record["history"][-1]["loss"] if record["history"] else None, lr_at_end)

    record = _sft("warmup", "warmup", settings, student, data, out_dir, "linear_warmup", finish=save_optimizer_state)
    _announce(done, out_dir, "warmup", record["steps"])


def train_sft(settings: dict, student: str, data: str, out_dir: str, done: str, loss_json: str,
              loss_png: str) -> None:
    """Stage `sft_student`: settings = config `sft` + seed + chat_template."""
    out_dir = Path(out_dir)
    record = _sft("sft", "sft", settings, student, data, out_dir, "wsd")
    if _is_main_process():
        write_loss_curve(record, loss_json, loss_png, f"student SFT ({Path(data).name})")
    _announce(done, out_dir, "sft", record["steps"])


# --- DPO ------------------------------------------------------------------------------------

def dpo_tokenize(tokenizer, prompt: str, chosen: str, rejected: str) -> dict:
    """Token ids as generation saw them: the templated prompt verbatim, no special tokens added.

    The prompt already holds the chat template (and the BOS where the template puts one), so
    tokenizing it as plain text with the tokenizer's defaults would add a second BOS for Llama-3
    style tokenizers. Completions end with the template's end-of-turn token, where the teacher's
    generations stopped (for Llama-3-8B-Instruct <|eot_id|>, which is also its EOS).
    """
    eos = end_of_turn_token(tokenizer)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return {
        "prompt_ids": ids(prompt),
        "chosen_ids": ids(chosen if chosen.endswith(eos) else chosen + eos),
        "rejected_ids": ids(rejected if rejected.endswith(eos) else rejected + eos),
    }


# TRL 1.16's DPOTrainer has no public way in for pre-tokenized pairs: its only tokenization is the
# private `_prepare_dataset(dataset, processing_class, args, dataset_name)`, which would add a
# second BOS to our already templated prompts. We override it, pin TRL to 1.16.x (pyproject.toml),
# and check here, and in tests/test_training.py, that the hook is still the one we override.
DPO_PREPARE_DATASET_PARAMETERS = ("self", "dataset", "processing_class", "args", "dataset_name")


def check_dpo_prepare_dataset_hook(trainer_cls) -> None:
    import inspect

    import trl

    hook = getattr(trainer_cls, "_prepare_dataset", None)
    parameters = tuple(inspect.signature(hook).parameters) if hook else None
    if parameters != DPO_PREPARE_DATASET_PARAMETERS:
        raise MontessoriError(
            f"trl {trl.__version__}: DPOTrainer._prepare_dataset is {parameters}, not "
            f"{DPO_PREPARE_DATASET_PARAMETERS}: montessori.training tokenizes DPO pairs through it "
            f"(tested with trl 1.16); install trl 1.16.x (requirements-cpu.txt)")


def _dpo_trainer_cls():
    from trl import DPOTrainer

    check_dpo_prepare_dataset_hook(DPOTrainer)

    class VerbatimPromptDPOTrainer(_scheduled(DPOTrainer)):
        """DPO on prompts that are already chat-formatted: tokenized verbatim by `dpo_tokenize`."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            dataset = dataset.map(
                lambda row: dpo_tokenize(tokenizer, row["prompt"], row["chosen"], row["rejected"]),
                remove_columns=dataset.column_names, desc=f"Tokenizing {dataset_name} pairs",
            )
            if args.max_length is not None:
                kept = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
                if not len(kept):
                    longest = max(len(row["prompt_ids"]) for row in dataset)
                    raise ConfigError(f"config key 'dpo.max_length' ({args.max_length}): every pair's prompt "
                                      f"alone fills it (longest prompt {longest} tokens); raise it")
                if len(kept) < len(dataset):
                    log.warning("dpo: %d pairs whose prompt alone fills max_length=%d are skipped",
                                len(dataset) - len(kept), args.max_length)
                dataset = kept
            return dataset

    return VerbatimPromptDPOTrainer


def dpo_rows(pairs: str | os.PathLike) -> list[dict]:
    rows = []
    for number, record in enumerate(read_jsonl(pairs), start=1):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise DataError(f"{pairs}: record {number} has no non-empty string '{key}'")
        rows.append({key: record[key] for key in ("prompt", "chosen", "rejected")})
    if not rows:
        raise DataError(f"{pairs}: no preference pairs (the pairs stage should have stopped the run)")
    return rows


def build_dpo_trainer(settings: dict, teacher_path: str, pairs: str, out_dir: Path):
    """The DPO trainer: policy and reference both loaded from the teacher before this round."""
    from datasets import Dataset
    from trl import DPOConfig

    tokenizer = _tokenizer_with_template(teacher_path, settings.get("chat_template"))
    beta = settings.get("beta", 0.1)
    if not isinstance(beta, (int, float)) or beta <= 0:
        raise ConfigError(f"config key 'dpo.beta' must be > 0, got {beta!r}")
    args = DPOConfig(**_trainer_args(settings, "dpo", out_dir, derive_seed(settings.get("seed", 0), "dpo")),
                     beta=float(beta), precompute_ref_log_probs=False, dataset_num_proc=None)
    model = load_causal_lm(teacher_path, "float32", "cpu")
    ref_model = load_causal_lm(teacher_path, "float32", "cpu")
    return _dpo_trainer_cls()(
        model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(dpo_rows(pairs)),
        processing_class=tokenizer, lr_schedule=settings.get("schedule", "wsd"), schedule_key="dpo.schedule",
    ), tokenizer


def train_dpo(settings: dict, teacher: str, pairs: str, out_dir: str, done: str, loss_json: str,
              loss_png: str) -> None:
    """Stage `dpo_teacher`: settings = config `dpo` + seed (+ chat_template, for a teacher without one)."""
    out_dir = Path(out_dir)
    path = model_path(teacher)

    def make_trainer():
        trainer, _ = build_dpo_trainer(settings, path, pairs, out_dir)
        log.info("dpo: %d pairs, beta %g, lr %g", len(trainer.train_dataset), trainer.args.beta,
                 trainer.args.learning_rate)
        return trainer

    record = _train_once("dpo", "dpo", out_dir, _fingerprint("dpo", settings, path, pairs), make_trainer)
    if _is_main_process():
        write_loss_curve(record, loss_json, loss_png, "teacher DPO")
    _announce(done, out_dir, "dpo", record["steps"])
