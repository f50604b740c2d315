"""The judge-free NLL metric: held-out selection, per-item losses on the tiny model, the summary."""

import json

import pytest

from montessori.errors import DataError
from montessori.evaluation.nll import evaluate_nll, held_out_items
from montessori.io import read_json, read_jsonl

ANSWERS = [
    ("Why is the sea salty?", "Rivers carry dissolved minerals from rocks into the sea, and evaporation leaves the salt behind."),
    ("Name a primary colour.", "Red is a primary colour of paint, along with yellow and blue."),
    ("What does a thermometer measure?", "A thermometer measures temperature, how hot or cold something is."),
    ("Give a synonym for 'quick'.", "Fast, rapid or swift all mean quick."),
    ("How many legs does a spider have?", "A spider has eight legs, which sets it apart from insects with six."),
]


@pytest.fixture
def files(tmp_path):
    source = tmp_path / "answers.jsonl"
    source.write_text("".join(json.dumps({"id": f"a{i}", "instruction": q, "response": a}) + "\n"
                              for i, (q, a) in enumerate(ANSWERS)))
    seed_pool = tmp_path / "seed_pool.jsonl"
    seed_pool.write_text(json.dumps({"id": "seed-00000", "text": ANSWERS[1][0]}) + "\n"
                         + json.dumps({"id": "seed-00001", "text": "An unrelated seed."}) + "\n")
    reference = tmp_path / "reference.jsonl"
    reference.write_text(json.dumps({"id": "ref-000", "instruction": ANSWERS[3][0], "response": "x"}) + "\n")
    return {"source": str(source), "seed_pool": str(seed_pool), "reference": str(reference)}


def _settings(files, **nll):
    return {"seed": 42, "chat_template": None,
            "nll": {"source": files["source"], "split": "train", "limit": None, "max_length": 256, "batch_size": 2,
                    **nll}}


def test_items_in_the_seed_pool_or_reference_set_are_dropped_and_counted(files):
    items, counts = held_out_items(_settings(files)["nll"], files["seed_pool"], files["reference"])
    assert [item["id"] for item in items] == ["a0", "a2", "a4"]
    assert counts == {"in_source": 5, "dropped_in_seed_pool": 1, "dropped_in_reference": 1, "evaluated": 3}
    limited, counts = held_out_items(_settings(files, limit=2)["nll"], files["seed_pool"], files["reference"])
    assert [item["id"] for item in limited] == ["a0", "a2"] and counts["evaluated"] == 2


def test_a_source_holding_only_training_instructions_is_refused(files, tmp_path):
    only_seeds = tmp_path / "only_seeds.jsonl"
    only_seeds.write_text(json.dumps({"instruction": ANSWERS[1][0], "response": ANSWERS[1][1]}) + "\n")
    with pytest.raises(DataError, match=r"only_seeds.jsonl: every item's instruction is in the seed pool"):
        held_out_items({"source": str(only_seeds)}, files["seed_pool"], files["reference"])


def test_per_item_nll_is_the_training_loss_on_answer_tokens(files, tmp_path, student, tiny_model_dir):
    import torch

    from montessori.chat import encode_pair
    from montessori.models import load_causal_lm, load_tokenizer

    out, summary = tmp_path / "items.jsonl", tmp_path / "summary.json"
    evaluate_nll(_settings(files), str(student), files["seed_pool"], files["reference"], str(out), str(summary),
                 name="base")
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["a0", "a2", "a4"]

    # independently: transformers' own loss (mean over labelled tokens) on encode_pair's masking
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, "float32", "cpu").eval()
    for record, (instruction, response) in zip(records, [ANSWERS[0], ANSWERS[2], ANSWERS[4]]):
        pair = encode_pair(tokenizer, instruction, response, 256)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([pair["input_ids"]]), labels=torch.tensor([pair["labels"]])).loss
        assert record["nll"] == pytest.approx(float(loss), rel=1e-5)
        assert record["tokens"] == sum(label != -100 for label in pair["labels"][1:])

    result = read_json(summary)
    weighted = sum(r["nll"] * r["tokens"] for r in records) / sum(r["tokens"] for r in records)
    assert result["nll"] == pytest.approx(weighted)
    assert result["nll_low"] < result["nll"] < result["nll_high"]
    assert (result["model"], result["n_items"], result["items"]) == ("base", 3, "items.jsonl")
    assert (result["dropped_in_seed_pool"], result["dropped_in_reference"], result["in_source"]) == (1, 1, 5)

    # the batch size is throughput only (runtime.py): the same numbers one item at a time
    out_one = tmp_path / "items_one.jsonl"
    evaluate_nll(_settings(files, batch_size=1), str(student), files["seed_pool"], files["reference"], str(out_one),
                 str(tmp_path / "summary_one.json"), name="base")
    for one, batched in zip(read_jsonl(out_one), records):
        assert one["nll"] == pytest.approx(batched["nll"], rel=1e-6) and one["tokens"] == batched["tokens"]
    assert read_json(tmp_path / "summary_one.json")["nll_low"] == pytest.approx(result["nll_low"], rel=1e-6)


def test_an_answer_cut_off_by_max_length_names_the_config_key(files, tmp_path, student):
    with pytest.raises(DataError, match=r"evaluation.nll.max_length=16"):
        evaluate_nll(_settings(files, max_length=16), str(student), files["seed_pool"], files["reference"],
                     str(tmp_path / "items.jsonl"), str(tmp_path / "summary.json"), name="base")
