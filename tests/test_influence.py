"""Local data influence on a tiny model: exact == original algorithm, first order == finite
difference, restore restores, resume after a kill, merge errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import montessori.io as montessori_io
from montessori import influence, placement
from montessori.adamw_replay import Scratch, WarmupState, adamw_apply_, adamw_update_dot
from montessori.chat import encode_pair
from montessori.errors import ConfigError, DataError
from montessori.io import read_json, read_jsonl, write_jsonl_atomic
from montessori.models import write_model_card
from montessori.optim_state import save_adamw_state, trainer_param_groups

MAX_LENGTH = 64


def alpaca_pairs(shared_data, start, count, prefix):
    rows = json.loads((shared_data / "seeds" / "alpaca_gpt4_demo_1k.json").read_text())
    pairs = []
    for i, row in enumerate(rows[start:start + count]):
        instruction = " ".join(x for x in (row["instruction"], row["input"]) if x)
        pairs.append({"id": f"{prefix}-{i:02d}", "group": f"{prefix}-g{i // 2}", "instruction": instruction,
                      "response": row["output"]})
    return pairs


@pytest.fixture(scope="module")
def warmup(tiny_model_dir, shared_data, tmp_path_factory):
    """A real warm-up state: a few torch AdamW steps (Trainer-style groups), saved as the warm-up does."""
    out = tmp_path_factory.mktemp("warmup")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(trainer_param_groups(model, 0.1), lr=2e-3, betas=(0.9, 0.95), eps=1e-8)
    for pair in alpaca_pairs(shared_data, 100, 4, "warm"):
        item = encode_pair(tokenizer, pair["instruction"], pair["response"], MAX_LENGTH)
        model(input_ids=torch.tensor([item["input_ids"]]), labels=torch.tensor([item["labels"]])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_adamw_state(model, optimizer, 2e-3, out)
    card = out.parent / "warmup.done"
    write_model_card(card, out)
    return card


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_jsonl_atomic(root / "probing.jsonl", alpaca_pairs(shared_data, 0, 6, "probe"))
    # responses of uneven lengths, not sorted: sorting the forward batches by length regroups them
    reference = [{"id": p["id"], "instruction": p["instruction"], "response": p["response"][:chars]}
                 for p, chars in zip(alpaca_pairs(shared_data, 50, 5, "ref"), (120, 15, 200, 40, 80))]
    write_jsonl_atomic(root / "reference.jsonl", reference)
    return root / "probing.jsonl", root / "reference.jsonl"


def settings(**overrides):
    return {"mode": "exact", "shards": 1, "gpus_per_shard": 1, "precision": "fp32", "batch_size": 2,
            "max_length": MAX_LENGTH, "spearman_check": 0, "seed": 42, **overrides}


def run_shard(tmp_path, warmup, data, name, shard=0, **overrides):
    probing, reference = data
    out, summary = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.summary.json"
    influence.score_shard(settings(**overrides), warmup=str(warmup), probing=str(probing),
                          reference=str(reference), out=str(out), summary=str(summary), shard=shard)
    return read_jsonl(out), read_json(summary)


def load_scorer(warmup, data, aggregation="pooled"):
    from montessori.models import model_path

    checkpoint = model_path(warmup)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    state = WarmupState.load(checkpoint, model, torch.float32)
    reference = influence.encode_records(tokenizer, read_jsonl(data[1]), MAX_LENGTH, data[1])
    reference_set = influence.ReferenceSet.build(reference, 2, aggregation, tokenizer.pad_token_id, "cpu")
    probes = influence.encode_records(tokenizer, read_jsonl(data[0]), MAX_LENGTH, data[0])
    pairs = [influence.make_batches([p], 1, tokenizer.pad_token_id, "cpu")[0] for p in probes]
    return influence.WarmStart(model, state, reference_set), pairs


def textbook_adamw_delta(param, grad, exp_avg, exp_avg_sq, *, step, lr, betas, eps, weight_decay):
    """theta' - theta of one AdamW step, written out in float64 as in the AdamW paper."""
    param, grad, m, v = (t.detach().double() for t in (param, grad, exp_avg, exp_avg_sq))
    t = step + 1
    m_hat = (betas[0] * m + (1 - betas[0]) * grad) / (1 - betas[0] ** t)
    v_hat = (betas[1] * v + (1 - betas[1]) * grad * grad) / (1 - betas[1] ** t)
    return -lr * (m_hat / (v_hat.sqrt() + eps) + weight_decay * param)


def test_update_math_is_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(50, 7))
    optimizer = torch.optim.AdamW([param], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        param.grad = torch.randn_like(param)
        optimizer.step()
    state = optimizer.state[param]
    exp_avg, exp_avg_sq, step = state["exp_avg"].clone(), state["exp_avg_sq"].clone(), int(state["step"])
    before = param.detach().clone()
    param.grad = torch.randn_like(param)
    hyper = {"step": step, "lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    predicted = param.detach().clone()
    scratch = Scratch()
    adamw_apply_(predicted, param.grad, exp_avg, exp_avg_sq, scratch, **hyper)
    delta = textbook_adamw_delta(param, param.grad, exp_avg, exp_avg_sq, **hyper)
    vector = torch.randn_like(param)
    without_decay = {k: v for k, v in hyper.items() if k != "weight_decay"}
    dot = adamw_update_dot(vector, param.grad, exp_avg, exp_avg_sq, scratch, **without_decay)
    optimizer.step()
    assert torch.equal(predicted, param.detach())
    # up to the rounding of theta + delta in fp32 (|theta| ~ 2 here)
    torch.testing.assert_close(before.double() + delta, param.detach().double(), rtol=0, atol=5e-7)
    # the first-order dot: the step's dot product, less its weight-decay term (added by the caller)
    expected = float(vector.double().view(-1) @ (delta + 3e-3 * 0.1 * before.double()).view(-1))
    assert dot == pytest.approx(expected, rel=1e-5)
    # the moments given were not touched
    assert not torch.equal(exp_avg, state["exp_avg"])


def test_aggregation_weights():
    counts = [10, 30, 5, 5, 50]
    assert influence.aggregation_weights(counts, "pooled", 2) == [1 / 100] * 5
    # file-order batches {10, 30}, {5, 5}, {50}: each batch's mean, averaged over 3 batches
    assert influence.aggregation_weights(counts, "batch_mean", 2) == pytest.approx(
        [1 / 120, 1 / 120, 1 / 30, 1 / 30, 1 / 150])
    with pytest.raises(ConfigError, match="influence.loss_aggregation"):
        influence.aggregation_weights(counts, "median", 2)


def test_batch_mean_is_fixed_by_file_order_whatever_the_forward_batches(tiny_model_dir, data):
    """batch_mean batches are the file's consecutive records; exact's length-sorted forward
    batches regroup the records, which must change nothing: each record's loss is weighted by
    its file-order batch."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    encoded = influence.encode_records(tokenizer, read_jsonl(data[1]), MAX_LENGTH, data[1])
    pad = tokenizer.pad_token_id
    file_order = influence.make_batches(encoded, 2, pad, "cpu", pad_to=MAX_LENGTH, sort_by_length=False)
    original = influence.original_reference_loss(model, file_order, "batch_mean")
    built = influence.ReferenceSet.build(encoded, 2, "batch_mean", pad, "cpu")
    assert [b["rows"] for b in built.batches] != [b["rows"] for b in file_order]  # really regrouped
    assert built.loss(model) == pytest.approx(original, abs=1e-9)
    for forward_size in (1, 3, 5):
        regrouped = influence.ReferenceSet(influence.make_batches(encoded, forward_size, pad, "cpu"), built.weights)
        assert regrouped.loss(model) == pytest.approx(original, abs=1e-9), forward_size
    pooled = influence.ReferenceSet.build(encoded, 2, "pooled", pad, "cpu").loss(model)
    assert pooled == pytest.approx(influence.original_reference_loss(model, file_order, "pooled"), abs=1e-9)
    assert abs(pooled - original) > 1e-3  # the two aggregations differ on this uneven set


@pytest.mark.parametrize("aggregation", ["pooled", "batch_mean"])
def test_exact_equals_the_original_algorithm(tmp_path, warmup, data, aggregation):
    """`exact` (length-sorted forward batches, per-record weights) against the original (file-order
    batches padded to max_length, each batch's own mean): the same loss under either aggregation."""
    exact, exact_summary = run_shard(tmp_path, warmup, data, "exact", mode="exact", loss_aggregation=aggregation)
    original, original_summary = run_shard(tmp_path, warmup, data, "reference", mode="reference",
                                           loss_aggregation=aggregation)
    assert exact_summary["loss_aggregation"] == original_summary["loss_aggregation"] == aggregation
    assert [r["id"] for r in exact] == [r["id"] for r in original] == [f"probe-{i:02d}" for i in range(6)]
    for a, b in zip(exact, original):
        for key in ("loss_before", "loss_after", "influence", "influence_vs_momentum", "probe_loss"):
            assert abs(a[key] - b[key]) <= 1e-6, (key, a, b)
        assert a["group"] == b["group"]
    assert abs(exact_summary["momentum_loss"] - original_summary["momentum_loss"]) <= 1e-6
    # the step is large on this random model: scores are far from rounding noise
    assert max(abs(r["influence"]) for r in exact) > 1e-3


def test_each_record_keeps_the_probes_own_loss_at_the_warmup_weights(tmp_path, warmup, data):
    """pairs.signal loss reads `probe_loss`: the probe's response-token loss before its step."""
    scorer, pairs = load_scorer(warmup, data)
    with torch.no_grad():
        expected = [float(total) / count for total, count in (influence.response_nll(scorer.model, p) for p in pairs)]
    assert len(set(expected)) == len(expected)
    for mode in ("exact", "first_order"):
        records, _ = run_shard(tmp_path, warmup, data, mode, mode=mode)
        assert [r["probe_loss"] for r in records] == pytest.approx(expected, abs=1e-5), mode


def test_restore_is_bit_identical_after_every_example(warmup, data):
    scorer, pairs = load_scorer(warmup, data)
    weights = {n: p.detach().clone() for n, p in scorer.model.named_parameters()}
    moments = {n: (scorer.state.exp_avg[n].clone(), scorer.state.exp_avg_sq[n].clone()) for n in weights}
    scorer.compute_reference_grad()

    def unchanged():
        return all(torch.equal(p, weights[n]) for n, p in scorer.model.named_parameters()) and all(
            torch.equal(scorer.state.exp_avg[n], m) and torch.equal(scorer.state.exp_avg_sq[n], v)
            for n, (m, v) in moments.items())

    scorer.momentum_only()
    assert unchanged()
    losses = []
    for pair in pairs:
        result = scorer.score(pair, exact=True, first_order=True)
        assert all(p.grad is None for p in scorer.model.parameters())
        assert unchanged()
        losses.append(result["loss_after"])
    assert len(set(losses)) == len(losses)  # each pair really moved the weights
    # scoring the same pair twice gives the same number: nothing leaks from one example to the next
    assert scorer.score(pairs[0], exact=True, first_order=False)["loss_after"] == losses[0]


@pytest.mark.parametrize("aggregation", ["pooled", "batch_mean"])
def test_first_order_matches_a_finite_difference(warmup, data, aggregation):
    scorer, pairs = load_scorer(warmup, data, aggregation)
    # The tokenizer's pad token is <|im_end|>, which ends every response; nn.Embedding(padding_idx)
    # drops its input occurrences from the gradient (as in training), which a finite difference
    # would not. Compare the two on the plain derivative.
    scorer.model.model.embed_tokens.padding_idx = None
    scorer.compute_reference_grad()
    params = scorer.params
    for pair in pairs[:3]:
        estimate = scorer.score(pair, exact=False, first_order=True)["first_order"]
        # the AdamW update direction of this pair, from a plain backward
        total, count = influence.response_nll(scorer.model, pair)
        (total / count).backward()
        with torch.no_grad():
            delta = {n: textbook_adamw_delta(p, p.grad, *scorer._moments(n), **scorer._hyper(n))
                     for n, p in params.items()}
        scorer.model.zero_grad(set_to_none=True)
        # the finite difference in float64, where a small step is far above rounding noise
        model64 = copy.deepcopy(scorer.model).double()
        params64 = dict(model64.named_parameters())
        eps = 1e-2
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for n, p in params.items():
                    params64[n].copy_(p.double() + sign * eps * delta[n].double())
            losses.append(scorer.reference.loss(model64))
        central = (losses[0] - losses[1]) / (2 * eps)
        assert abs(estimate) > 1e-4
        assert estimate == pytest.approx(central, rel=2e-3)


def test_first_order_mode_with_spearman_check(tmp_path, warmup, data):
    records, summary = run_shard(tmp_path, warmup, data, "fo", mode="first_order", spearman_check=4)
    assert len(records) == 6
    checked = [r for r in records if "influence_exact" in r]
    assert [r["id"] for r in checked] == [f"probe-{i:02d}" for i in range(4)]
    for r in records:
        assert r["influence"] == r["influence_first_order"] if "influence_first_order" in r else True
        assert r["loss_after"] == pytest.approx(r["loss_before"] + r["influence"])
    assert summary["spearman_count"] == 4 and summary["spearman_first_order_vs_exact"] is not None
    exact, _ = run_shard(tmp_path, warmup, data, "ex", mode="exact")
    for fo, ex in zip(checked, exact):
        assert fo["influence_exact"] == pytest.approx(ex["influence"], abs=1e-6)


def test_shards_split_the_probing_set(tmp_path, warmup, data):
    whole, _ = run_shard(tmp_path, warmup, data, "whole")
    parts = [run_shard(tmp_path, warmup, data, f"part{i}", shard=i, shards=2)[0] for i in range(2)]
    assert [r["id"] for r in parts[0] + parts[1]] == [r["id"] for r in whole]
    for a, b in zip(parts[0] + parts[1], whole):
        assert a["influence"] == b["influence"]


def test_resume_after_a_kill_skips_done_ids_and_matches(tmp_path, warmup, data, monkeypatch):
    uninterrupted, _ = run_shard(tmp_path, warmup, data, "full")

    real_append = montessori_io.ShardWriter.append

    class Killed(Exception):
        pass

    def dying_append(self, record):
        if len(self.records) == 2:
            with self.path.open("a") as handle:  # a kill in the middle of writing the third line
                handle.write(json.dumps(record)[:20])
            raise Killed
        real_append(self, record)

    monkeypatch.setattr(montessori_io.ShardWriter, "append", dying_append)
    with pytest.raises(Killed):
        run_shard(tmp_path, warmup, data, "killed")
    monkeypatch.setattr(montessori_io.ShardWriter, "append", real_append)

    scored = []
    real_score = influence.WarmStart.score

    def counting_score(self, batch, exact, first_order):
        scored.append(batch["input_ids"].shape)
        return real_score(self, batch, exact, first_order)

    monkeypatch.setattr(influence.WarmStart, "score", counting_score)
    resumed, summary = run_shard(tmp_path, warmup, data, "killed")
    assert len(scored) == 4
    assert summary["count"] == 6
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert strip(resumed) == strip(uninterrupted)


def test_bad_modes_and_missing_gpus_are_reported_by_key(tmp_path, warmup, data):
    with pytest.raises(ConfigError, match=r"influence.gpus_per_shard=2: this job sees 0 CUDA device"):
        run_shard(tmp_path, warmup, data, "x", gpus_per_shard=2)
    with pytest.raises(ConfigError, match="influence.mode"):
        run_shard(tmp_path, warmup, data, "x", mode="fast")


def untied_skeleton(layers: int):
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    with init_empty_weights():
        return LlamaForCausalLM(config)


@pytest.mark.parametrize("devices", [2, 3, 4])
def test_layer_split_is_consecutive_balanced_and_covers_every_parameter(devices):
    model = untied_skeleton(layers=12)
    split = placement.layer_split(model, devices)
    assert list(split.values()) == sorted(split.values()), "modules must go to devices in forward order"
    assert set(split.values()) == set(range(devices))
    parameters = {name for name, _ in model.named_parameters()}
    covered = {name for name in parameters if any(name == unit or name.startswith(unit + ".") for unit in split)}
    assert covered == parameters
    assert all(name.startswith("model.layers.") and name.count(".") == 2 for name in split
               if name.startswith("model.layers"))          # whole blocks, never half a layer
    loads = [0] * devices
    for name, param in model.named_parameters():
        unit = next(u for u in split if name == u or name.startswith(u + "."))
        loads[split[unit]] += param.numel()
    largest_unit = max(sum(p.numel() for p in module.parameters()) for _, module in placement.placement_units(model))
    assert max(loads) - min(loads) <= 2 * largest_unit, loads


def test_a_tied_head_stays_with_the_embeddings(tiny_model_dir):
    split = placement.layer_split(placement.model_skeleton(tiny_model_dir), 2)
    assert split["lm_head"] == split["model.embed_tokens"] == 0
    assert split["model.layers.0"] == 1                  # the embeddings are most of this tiny model


def test_a_shard_over_several_devices_scores_as_one_device(tmp_path, warmup, data, monkeypatch):
    """The multi-GPU placement path (layer split, dispatched model, moments and scratch per
    parameter device, labels on the head's device) on two stand-in devices of this CPU."""
    single, _ = run_shard(tmp_path, warmup, data, "one-device", mode="exact")
    monkeypatch.setattr(placement, "visible_gpus", lambda: ["cpu", "cpu"])
    spread, summary = run_shard(tmp_path, warmup, data, "two-devices", mode="exact", gpus_per_shard=2)
    assert summary["devices"] == ["cpu", "cpu"]
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert strip(spread) == strip(single)
    for mode in ("first_order", "reference"):
        one, _ = run_shard(tmp_path, warmup, data, f"one-device-{mode}", mode=mode)
        two, _ = run_shard(tmp_path, warmup, data, f"two-devices-{mode}", mode=mode, gpus_per_shard=2)
        assert strip(two) == strip(one), mode


def _record(i, influence_value):
    return {"id": f"probe-{i:02d}", "group": "g", "loss_before": 1.0, "loss_after": 1.0 + influence_value,
            "influence": influence_value, "influence_vs_momentum": influence_value + 0.01, "seconds": 0.1}


def test_merge_writes_table_summary_histogram(tmp_path, data):
    probing = data[0]
    write_jsonl_atomic(tmp_path / "s1.jsonl", [_record(i, 0.01 * i - 0.02) for i in (3, 4, 5)])
    write_jsonl_atomic(tmp_path / "s0.jsonl", [_record(i, 0.01 * i - 0.02) for i in (0, 1, 2)])
    out, summary, histogram = tmp_path / "influence.jsonl", tmp_path / "summary.json", tmp_path / "hist.png"
    influence.merge_influence({}, shard_paths=[str(tmp_path / "s1.jsonl"), str(tmp_path / "s0.jsonl")],
                              probing=str(probing), out=str(out), summary=str(summary), histogram=str(histogram))
    merged = read_jsonl(out)
    assert [r["id"] for r in merged] == [f"probe-{i:02d}" for i in range(6)]
    result = read_json(summary)
    assert result["count"] == 6
    assert result["fraction_negative"] == {"influence": 2 / 6, "influence_vs_momentum": 1 / 6}
    assert result["influence"]["mean"] == pytest.approx(0.005)
    assert histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_errors_for_missing_and_duplicate_ids(tmp_path, data):
    probing = data[0]
    paths = dict(probing=str(probing), out=str(tmp_path / "o.jsonl"), summary=str(tmp_path / "s.json"),
                 histogram=str(tmp_path / "h.png"))
    write_jsonl_atomic(tmp_path / "a.jsonl", [_record(i, 0.0) for i in range(5)])
    with pytest.raises(DataError, match=r"1 expected ids missing .*probe-05"):
        influence.merge_influence({}, shard_paths=[str(tmp_path / "a.jsonl")], **paths)
    write_jsonl_atomic(tmp_path / "b.jsonl", [_record(i, 0.0) for i in (4, 5)])
    with pytest.raises(DataError, match=r"'probe-04' appears twice"):
        influence.merge_influence({}, shard_paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], **paths)
    assert not (tmp_path / "o.jsonl").exists()


def test_one_gpu_placement_loads_weights_straight_to_that_gpu(monkeypatch):
    """Without a device map transformers builds the whole model in host memory first (32 GB for
    an 8B model in fp32); with {"": gpu} it reads each tensor onto the GPU."""
    calls = []
    monkeypatch.setattr(placement, "load_causal_lm", lambda *args, **kwargs: calls.append((args, kwargs)))
    placement.Placement(["cuda:0"]).load("ckpt", "bfloat16")
    placement.Placement(["cpu"]).load("ckpt", "float32")
    assert calls[0][1]["device_map"] == {"": torch.device("cuda:0")}
    assert calls[1][1]["device_map"] is None
