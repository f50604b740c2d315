"""Warm-up, student SFT and teacher DPO on a tiny random Llama: masking, resume, state, prompts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from montessori import training
from montessori.chat import IGNORE_INDEX, chat_completion_text, chat_prompt, encode_pair
from montessori.errors import ConfigError, DataError, ModelError
from montessori.figures import REWARD_KEYS
from montessori.io import read_json, write_json_atomic, write_jsonl_atomic
from montessori.models import load_tokenizer, write_model_card
from state_helpers import load_adamw_state
from montessori.schedules import schedule_factor

RECORDS = [{"id": f"r{i}", "instruction": f"Name the number after {i}.",
            "response": f"The number after {i} is {i + 1}." + " Indeed." * (i % 3)} for i in range(12)]
WSD = {"warmup": 0.1, "stable": 0.5, "decay": 0.4, "min_lr_ratio": 0.001}


def sft_settings(**overrides) -> dict:
    return {"lr": 1e-3, "epochs": 1, "batch_size": 2, "effective_batch": 2, "max_length": 128,
            "save_steps": 2, "schedule": WSD, "seed": 7, "chat_template": None, **overrides}


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    write_jsonl_atomic(path, RECORDS)
    return path


def run_sft(tmp_path, name, student, data, settings) -> dict:
    paths = {"out_dir": tmp_path / name, "done": tmp_path / f"{name}.done",
             "loss_json": tmp_path / f"{name}.loss.json", "loss_png": tmp_path / f"{name}.loss.png"}
    training.train_sft(settings, student=str(student), data=str(data), **{k: str(v) for k, v in paths.items()})
    return paths


def weights(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_sft_batches_carry_loss_on_response_tokens_only(tmp_path, tiny_model_dir, data):
    tokenizer = load_tokenizer(tiny_model_dir)
    trainer = training.build_sft_trainer("sft", "sft", sft_settings(batch_size=4, effective_batch=4), tiny_model_dir, tokenizer,
                                         str(data), tmp_path / "out", "wsd")
    expected = {}
    for record in RECORDS:
        encoded = encode_pair(tokenizer, record["instruction"], record["response"], 128)
        expected[tuple(encoded["input_ids"])] = (record, encoded["labels"])
    rows = 0
    for batch in trainer.get_train_dataloader():
        for input_ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            length = int(mask.sum())
            assert mask[:length].all() and not mask[length:].any()       # right padding
            assert (labels[length:] == IGNORE_INDEX).all()               # padding carries no loss
            ids, labels = input_ids[:length].tolist(), labels[:length].tolist()
            record, expected_labels = expected[tuple(ids)]               # the very tokens influence scores
            assert labels == expected_labels
            prompt, completion = chat_completion_text(tokenizer, record["instruction"], record["response"])
            prompt_len = labels.index(next(label for label in labels if label != IGNORE_INDEX))
            assert tokenizer.decode(ids[:prompt_len]) == prompt
            assert all(label == IGNORE_INDEX for label in labels[:prompt_len])
            assert tokenizer.decode(labels[prompt_len:]) == completion
            # pad == eos for this tokenizer: the response's closing eos still carries loss.
            assert tokenizer.eos_token_id in labels[prompt_len:]
            rows += 1
    assert rows == len(RECORDS)


class Killed(Exception):
    pass


def test_sft_resumes_after_a_kill_and_matches_an_uninterrupted_run(tmp_path, student, data, monkeypatch):
    settings = sft_settings()
    reference = run_sft(tmp_path, "uninterrupted", student, data, settings)

    from transformers import Trainer

    save_checkpoint = Trainer._save_checkpoint

    def save_then_die(self, model, trial):
        save_checkpoint(self, model, trial)
        if self.state.global_step == 4:
            raise Killed

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run_sft(tmp_path, "killed", student, data, settings)
    monkeypatch.undo()
    out_dir = tmp_path / "killed"
    assert sorted(p.name for p in out_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "killed.done").exists()
    # A second kill, in the middle of writing the next checkpoint, leaves it incomplete.
    (out_dir / "checkpoint-6").mkdir()
    (out_dir / "checkpoint-6" / "model.safetensors").write_bytes(b"partial")

    resumed = run_sft(tmp_path, "killed", student, data, settings)
    loss = read_json(resumed["loss_json"])
    reference_loss = read_json(reference["loss_json"])
    assert loss["resumed_from_step"] == 4 and loss["steps"] == 6
    assert loss["history"] == reference_loss["history"]
    expected, got = weights(reference["out_dir"]), weights(out_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert not list(out_dir.glob("checkpoint-*"))
    assert read_json(resumed["done"])["path"] == str(out_dir)
    assert resumed["loss_png"].read_bytes().startswith(b"\x89PNG")
    # The lr each step ran at is the configured WSD schedule.
    factor = schedule_factor(WSD, 6)
    assert [h["learning_rate"] for h in loss["history"]] == pytest.approx([1e-3 * factor(k) for k in range(6)])

    # Killed after the final save but before the done card: finishes without training again.
    resumed["done"].unlink()
    monkeypatch.setattr(training, "build_sft_trainer", lambda *a, **k: pytest.fail("trained again"))
    run_sft(tmp_path, "killed", student, data, settings)
    assert read_json(resumed["done"])["path"] == str(out_dir)


def test_checkpoints_from_other_settings_are_never_resumed(tmp_path):
    out_dir = tmp_path / "run"
    assert training._claim_out_dir(out_dir, "fingerprint-a") is None
    (out_dir / "checkpoint-2").mkdir()
    (out_dir / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert training._claim_out_dir(out_dir, "fingerprint-a") == str(out_dir / "checkpoint-2")
    assert training._claim_out_dir(out_dir, "fingerprint-b") is None
    assert not (out_dir / "checkpoint-2").exists()

    # A student retrained in place (a later round's input) is a different run.
    model_dir, data = tmp_path / "model", tmp_path / "data.jsonl"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"round 1")
    data.write_text('{"id": 1}\n')
    first = training._fingerprint("sft", {"lr": 1e-5}, str(model_dir), data)
    assert training._fingerprint("sft", {"lr": 1e-5}, str(model_dir), data) == first
    assert training._fingerprint("sft", {"lr": 2e-5}, str(model_dir), data) != first
    (model_dir / "model.safetensors").write_bytes(b"round 2, retrained")
    assert training._fingerprint("sft", {"lr": 1e-5}, str(model_dir), data) != first

    # Where the trainer also sends its logs is a runtime setting: the same run, its checkpoints resumed.
    assert training._fingerprint("sft", {"lr": 1e-5, "logging": {"report_to": "wandb"}}, str(model_dir), data) == \
        training._fingerprint("sft", {"lr": 1e-5}, str(model_dir), data)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    with pytest.raises(DataError, match="was not written by a training stage"):
        training._claim_out_dir(foreign, "fingerprint-a")


def test_warmup_saves_fp32_weights_and_adamw_moments(tmp_path, student, data, tiny_model_dir):
    settings = {"lr": 1e-3, "epochs": 1, "batch_size": 2, "effective_batch": 4, "schedule": "linear_warmup",
                "max_length": 128, "seed": 7, "chat_template": None}
    out_dir, done = tmp_path / "warmup", tmp_path / "warmup.done"
    training.warmup(settings, student=str(student), data=str(data), out_dir=str(out_dir), done=str(done))

    assert read_json(done)["path"] == str(out_dir)
    state = load_adamw_state(out_dir)
    assert state["step"] == 3                        # 12 records / effective batch 4
    assert state["lr"] == pytest.approx(1e-3)        # linear warm-up ends at the peak
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    names = {name for name, _ in model.named_parameters()}
    assert set(state["exp_avg"]) == names == set(state["exp_avg_sq"])
    assert all(t.dtype == torch.float32 for t in state["exp_avg"].values())
    assert all(state["exp_avg_sq"][name].abs().sum() > 0 for name in names)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    before = weights(tiny_model_dir)
    assert any(not torch.equal(before[name], tensor) for name, tensor in weights(out_dir).items())
    assert load_tokenizer(str(out_dir)).chat_template == load_tokenizer(tiny_model_dir).chat_template


def test_logging_report_to_reaches_the_trainer(tmp_path, student, data, monkeypatch):
    """config logging.report_to becomes the trainer's report_to; a reporting package that is not
    installed is a ConfigError naming the key (never needed offline: the default is none)."""
    from montessori.models import model_path

    path = model_path(student)
    tokenizer = load_tokenizer(path)

    def build(report_to: str):
        return training.build_sft_trainer("sft", "sft", sft_settings(logging={"report_to": report_to}), path,
                                          tokenizer, str(data), tmp_path / report_to, "wsd")

    assert build("none").args.report_to == []
    if training._installed(training.REPORTING_PACKAGES["tensorboard"]):
        trainer = build("tensorboard")
        assert trainer.args.report_to == ["tensorboard"]
        assert "TensorBoardCallback" in {type(callback).__name__ for callback in trainer.callback_handler.callbacks}
    else:
        with pytest.raises(ConfigError, match=r"'logging.report_to' is tensorboard, but tensorboard or tensorboardX"):
            build("tensorboard")
    # installed or not, the value is what the trainer's arguments are built with
    monkeypatch.setattr(training, "_installed", lambda packages: True)
    for report_to in ("tensorboard", "wandb"):
        args = training._trainer_args(sft_settings(logging={"report_to": report_to}), "sft", tmp_path, 0)
        assert args["report_to"] == report_to
    with pytest.raises(ConfigError, match="'logging.report_to' must be one of none, tensorboard, wandb"):
        training._trainer_args(sft_settings(logging={"report_to": "mlflow"}), "sft", tmp_path, 0)


def test_base_student_needs_and_gets_the_configured_template(tmp_path, tiny_model_dir, data):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink()
    config = read_json(base / "tokenizer_config.json")
    config.pop("chat_template", None)
    write_json_atomic(base / "tokenizer_config.json", config)
    card = tmp_path / "base.json"
    write_model_card(card, base)

    with pytest.raises(ModelError, match="models.chat_template"):
        run_sft(tmp_path, "no-template", card, data, sft_settings(save_steps=None))

    template = load_tokenizer(tiny_model_dir).chat_template.replace("<|im_start|>", "<|im_start|> ")
    paths = run_sft(tmp_path, "templated", card, data, sft_settings(save_steps=None, chat_template=template))
    assert load_tokenizer(str(paths["out_dir"])).chat_template == template


@pytest.fixture
def bos_teacher(tmp_path, tiny_model_dir) -> Path:
    """The tiny model with a Llama-3 style tokenizer: it adds a BOS, and so does its chat template."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)])
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    tokenizer.save_pretrained(teacher)
    card = tmp_path / "teacher.json"
    write_model_card(card, teacher)
    return card


def write_pairs(path, tokenizer, count=4) -> list[str]:
    prompts = [chat_prompt(tokenizer, f"Write a new task like example {i}.") for i in range(count)]
    write_jsonl_atomic(path, [
        {"id": f"p{i}", "group": f"g{i}", "prompt": prompt, "chosen": f"Describe a river in {i + 2} words.",
         "rejected": f"Draw map {i}", "chosen_id": f"c{i}", "rejected_id": f"r{i}",
         "chosen_score": -0.1, "rejected_score": 0.1} for i, prompt in enumerate(prompts)])
    return prompts


def test_dpo_sees_the_generation_prompt_tokens_verbatim(tmp_path, bos_teacher):
    from montessori.models import model_path

    path = model_path(bos_teacher)
    tokenizer = load_tokenizer(path)
    bos = tokenizer.bos_token_id
    prompts = write_pairs(tmp_path / "pairs.jsonl", tokenizer)
    # The hazard: plain tokenization of an already templated prompt doubles the BOS.
    assert tokenizer(prompts[0])["input_ids"][:2] == [bos, bos]

    trainer, _ = training.build_dpo_trainer(
        {"beta": 0.1, "lr": 1e-6, "epochs": 1, "batch_size": 2, "effective_batch": 2, "max_length": 512,
         "schedule": WSD, "seed": 7}, path, str(tmp_path / "pairs.jsonl"), tmp_path / "dpo")
    for row, prompt in zip(trainer.train_dataset, prompts):
        # generation.py feeds the model exactly these ids (add_special_tokens=False).
        assert row["prompt_ids"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(row["prompt_ids"]) == prompt                 # no second template
        assert row["prompt_ids"][0] == bos and row["prompt_ids"].count(bos) == 1
        assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tokenizer.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[0]])
    first = trainer.train_dataset[0]
    assert batch["input_ids"][0].tolist()[:len(first["prompt_ids"]) + len(first["chosen_ids"])] == \
        first["prompt_ids"] + first["chosen_ids"]
    # The reference is the teacher as loaded, a separate model.
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    ref = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(p, ref[name]) for name, p in trainer.model.named_parameters())


def test_dpo_trains_the_teacher_end_to_end(tmp_path, bos_teacher):
    from montessori.models import model_path

    path = model_path(bos_teacher)
    before = weights(path)
    write_pairs(tmp_path / "pairs.jsonl", load_tokenizer(path))
    out_dir, done = tmp_path / "teacher-dpo", tmp_path / "teacher.done"
    training.train_dpo(
        {"beta": 0.1, "lr": 1e-3, "epochs": 1, "batch_size": 2, "effective_batch": 2, "max_length": 512,
         "schedule": WSD, "seed": 7},
        teacher=str(bos_teacher), pairs=str(tmp_path / "pairs.jsonl"), out_dir=str(out_dir), done=str(done),
        loss_json=str(tmp_path / "dpo.loss.json"), loss_png=str(tmp_path / "dpo.loss.png"))

    assert read_json(done)["path"] == str(out_dir)
    loss = read_json(tmp_path / "dpo.loss.json")
    assert loss["steps"] == 2 and len(loss["history"]) == 2
    assert loss["history"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)    # policy == reference at step 1
    # every step's DPO rewards, which the analysis figure of the teacher's rewards reads
    assert all(key in entry for entry in loss["history"] for key in REWARD_KEYS)
    after = weights(out_dir)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert all(t.dtype == torch.float32 for t in after.values())
    assert weights(path).keys() == before.keys()
    assert all(torch.equal(weights(path)[name], before[name]) for name in before)    # the input teacher is untouched
    assert load_tokenizer(str(out_dir)).chat_template == load_tokenizer(path).chat_template


def test_dpo_refuses_prompts_longer_than_max_length(tmp_path, tiny_model_dir):
    import json

    from montessori.errors import ConfigError
    from montessori.models import write_model_card
    from montessori.training import train_dpo

    card = tmp_path / "teacher.json"
    write_model_card(card, tiny_model_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "word " * 80, "chosen": "yes", "rejected": "no"}) + "\n")
    settings = {"beta": 0.1, "lr": 1e-6, "batch_size": 1, "effective_batch": 1, "max_length": 32, "seed": 0}
    with pytest.raises(ConfigError, match="dpo.max_length"):
        train_dpo(settings, str(card), str(pairs), str(tmp_path / "out"), str(tmp_path / "done"),
                  str(tmp_path / "loss.json"), str(tmp_path / "loss.png"))


def test_an_upgrade_that_changes_the_dpo_hook_we_override_fails_loudly():
    """TRL 1.16 has no public way in for pre-tokenized DPO pairs; the private hook is checked."""
    from trl import DPOTrainer

    from montessori.errors import MontessoriError
    from montessori.training import check_dpo_prepare_dataset_hook

    check_dpo_prepare_dataset_hook(DPOTrainer)  # the installed TRL has the hook we override

    class Renamed:
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name, extra):
            return dataset

    for changed in (Renamed, object):
        with pytest.raises(MontessoriError, match=r"trl .*_prepare_dataset .*install trl 1\.16"):
            check_dpo_prepare_dataset_hook(changed)


# Turns end with <|endoftext|> (id 0), while the tokenizer's EOS is <|im_end|> (id 2), as
# Llama-3's <|eot_id|> against the base model's <|end_of_text|>.
OTHER_TURN_END = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
                  " + message['content'] | trim + '<|endoftext|>' }}{% endfor %}{% if add_generation_prompt %}"
                  "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def test_sft_and_dpo_labels_end_with_the_end_of_turn_token_not_eos(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, OTHER_TURN_END)
    assert tokenizer.eos_token_id == 2 and tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
    encoded = encode_pair(tokenizer, "Name a colour.", "Blue.", 128)
    assert encoded["labels"][-1] == 0 and 2 not in encoded["labels"]
    prompt = chat_prompt(tokenizer, "Write a task.")
    ids = training.dpo_tokenize(tokenizer, prompt, "<task>Name a colour.</task>", "<task>Draw.</task>")
    assert ids["chosen_ids"][-1] == 0 and ids["rejected_ids"][-1] == 0
    assert 2 not in ids["chosen_ids"] + ids["rejected_ids"]
    already_closed = training.dpo_tokenize(tokenizer, prompt, "Blue.<|endoftext|>", "Red.<|endoftext|>")
    assert already_closed["chosen_ids"].count(0) == 1
