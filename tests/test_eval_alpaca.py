"""AlpacaEval stages: outputs in alpaca_eval's format, weighted judging, cache, judge-answer parsing."""

import json
import math
import subprocess
from pathlib import Path

import pytest

from montessori.evaluation import alpaca_eval, judges
from montessori.evaluation.alpaca_eval import generate_outputs, judge_outputs
from montessori.models import write_model_card

ROOT = Path(__file__).resolve().parents[1]
EVAL_SET = ROOT / "data" / "eval" / "alpaca_eval.json"


def _logprob_response(top: list[tuple[str, float]]) -> dict:
    entries = [{"token": token, "logprob": logprob} for token, logprob in top]
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": top[0][0] if top else ""},
                         "logprobs": {"content": [{"token": top[0][0] if top else "", "logprob": 0.0,
                                                   "top_logprobs": entries}]}}]}


def test_annotator_prompt_and_parser_come_from_the_installed_package():
    import alpaca_eval

    package = Path(alpaca_eval.__file__).parent / "evaluators_configs"
    annotator = judges.alpaca_eval_annotator()
    template = (package / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt").read_text()
    assert annotator["prompt_template"] == template
    assert annotator["parser"].__module__ == "alpaca_eval.completion_parsers"
    assert annotator["parser_kwargs"] == {"numerator_token": "m", "denominator_tokens": ["m", "M"], "is_binarize": False}
    assert annotator["completions_kwargs"]["top_logprobs"] == 5 and annotator["completions_kwargs"]["max_tokens"] == 1
    messages = judges.alpaca_eval_messages(annotator, "Name a colour.", "Blue {braces}", "Red.")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == template.split("<|im_start|>system\n")[1].split("<|im_end|>")[0].strip()
    user = messages[1]["content"]
    assert '"""Name a colour."""' in user
    assert user.index('"""Blue {braces}"""') < user.index('"""Red."""')  # output_1 is labelled m, shown first
    # The prompt's text lives in the package only, never in this repository.
    phrase = max(template.splitlines(), key=len)
    tracked = subprocess.run(["git", "grep", "--untracked", "-l", "-F", phrase], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout == "", f"the annotator prompt is copied into {tracked.stdout}"


def test_package_parser_gives_the_weighted_preference():
    annotator = judges.alpaca_eval_annotator()
    response = _logprob_response([("M", math.log(0.6)), ("m", math.log(0.2)), ("The", math.log(0.1))])
    p_first, raw = judges.parse_alpaca_eval_completion(annotator, response)
    assert p_first == pytest.approx(0.25)  # .2 / (.2 + .6)
    assert judges.preference_from_probability(p_first, switched=False) == pytest.approx(1.75)
    # shown the other way round, the first shown output is the model: preference 1 + .25
    assert judges.preference_from_probability(p_first, switched=True) == pytest.approx(1.25)
    assert raw["top_logprobs"][0]["token"] == "M"
    assert judges.parse_alpaca_eval_completion(annotator, _logprob_response([("M", -0.1)]))[0] == 0.0
    assert math.isnan(judges.parse_alpaca_eval_completion(annotator, _logprob_response([("Both", -0.1)]))[0])
    assert math.isnan(judges.parse_alpaca_eval_completion(annotator, {"choices": [{"message": {"content": "m"}}]})[0])


def test_one_dispatch_for_judge_types():
    from montessori.errors import ConfigError

    assert judges.judge_loads_a_model({"type": "local"}) and judges.judge_loads_a_model({})
    assert not judges.judge_loads_a_model({"type": "api", "base_url": "http://x/v1", "model": "judge"})
    with pytest.raises(ConfigError, match="'evaluation.judge.base_url' must be set"):
        judges.judge_type({"type": "api", "model": "judge"})
    with pytest.raises(ConfigError, match="'evaluation.judge.type': 'remote' is not one of local, api"):
        judges.judge_type({"type": "remote"})


def test_generate_outputs_in_alpaca_eval_format(tmp_path, tiny_model_dir):
    card = tmp_path / "student.json"
    write_model_card(card, tiny_model_dir)
    out = tmp_path / "outputs.json"
    settings = {"seed": 3, "backend": "transformers", "batch_size": 2,
                "alpaca_eval": {"source": str(EVAL_SET), "limit": 3, "max_new_tokens": 4}}
    generate_outputs(settings, str(card), str(out), "base")
    rows = json.loads(out.read_text())
    source = json.loads(EVAL_SET.read_text())[:3]
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in source]
    assert all(set(r) == {"dataset", "instruction", "output", "generator"} for r in rows)
    assert all(r["generator"] == "base" and isinstance(r["output"], str) for r in rows)


def _outputs(path, n, generator="student"):
    source = json.loads(EVAL_SET.read_text())[:n]
    rows = [{"dataset": r["dataset"], "instruction": r["instruction"], "output": f"answer {i}: " + "x" * (5 * i),
             "generator": generator} for i, r in enumerate(source)]
    path.write_text(json.dumps(rows))


def test_judge_outputs_local_judge_and_cache(tmp_path, tiny_model_dir, monkeypatch):
    judge_card = tmp_path / "judge.json"
    write_model_card(judge_card, tiny_model_dir)
    outputs = tmp_path / "outputs.json"
    _outputs(outputs, 6)
    paths = {"annotations": tmp_path / "annotations.json", "metrics": tmp_path / "metrics.json",
             "cache": tmp_path / "cache.jsonl"}
    settings = {"seed": 42, "judge": {"type": "local", "model": "tiny"}, "alpaca_eval": {"position_bias_sample": 3}}
    judge_outputs(settings, str(outputs), str(EVAL_SET), judge=str(judge_card), **{k: str(v) for k, v in paths.items()})

    annotations = json.loads(paths["annotations"].read_text())
    assert len(annotations) == 6
    source = json.loads(EVAL_SET.read_text())[:6]
    assert [(r["output_1"], r["generator_1"]) for r in annotations] == [(r["output"], r["generator"]) for r in source]
    for row in annotations:
        assert {"instruction", "output_1", "generator_1", "output_2", "generator_2", "annotator", "preference"} <= set(row)
        assert row["generator_2"] == "student"
        assert 1 <= row["preference"] <= 2
        raw = row["raw_completion"]
        p_first = judges.probability_first(raw["logprob_m"], raw["logprob_M"])
        assert row["preference"] == pytest.approx(judges.preference_from_probability(p_first, row["is_switched_outputs"]))
    # the order shown to the judge is randomized
    assert len({row["is_switched_outputs"] for row in annotations}) == 2
    metrics = json.loads(paths["metrics"].read_text())
    expected_win_rate = sum(r["preference"] - 1 for r in annotations) / 6 * 100
    assert metrics["win_rate"] == pytest.approx(expected_win_rate)
    for key in ("standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "discrete_win_rate",
                "length_controlled_minimal", "n_missing"):
        assert key in metrics
    # no instruction difficulties or gamed baselines given: never the full length control's name
    assert metrics["length_control"] == "length_controlled_minimal" and "length_controlled_winrate" not in metrics
    assert metrics["generator"] == "student" and metrics["n_total"] == 6 and metrics["reference"] == "dataset"
    # position bias: 3 sampled comparisons, each also judged in the other order
    cached = [json.loads(line) for line in paths["cache"].read_text().splitlines()]
    assert len(cached) == 6 + 3 and metrics["position_bias_n"] == 3
    p_first = {record["key"]: record["p_first"] for record in cached}
    pairs = []
    for row in annotations:
        shown = (row["output_2"], row["output_1"]) if row["is_switched_outputs"] else (row["output_1"], row["output_2"])
        other_order = alpaca_eval._cache_key(row["annotator"], row["instruction"], *shown[::-1])
        if other_order in p_first:
            pairs.append((p_first[alpaca_eval._cache_key(row["annotator"], row["instruction"], *shown)],
                          p_first[other_order]))
    assert len(pairs) == 3
    assert metrics["position_bias_first_rate"] == pytest.approx(sum(a + b for a, b in pairs) / 6)

    # A rerun pays nothing: every comparison comes from the cache.
    def no_judge(*args, **kwargs):
        raise AssertionError("the judge was asked again")

    monkeypatch.setattr(alpaca_eval, "make_preference_judge", no_judge)
    paths["annotations"].unlink()
    judge_outputs(settings, str(outputs), str(EVAL_SET), judge=str(judge_card), **{k: str(v) for k, v in paths.items()})
    assert json.loads(paths["annotations"].read_text()) == annotations
    assert len(paths["cache"].read_text().splitlines()) == 6 + 3


def test_missing_judgements_are_counted_not_guessed(tmp_path, monkeypatch):
    outputs, reference = tmp_path / "outputs.json", tmp_path / "reference.json"
    _outputs(outputs, 4)
    _outputs(reference, 4, generator="self_instruct-round1")

    class HalfSilentJudge:
        calls = 0

        def judge(self, instruction, first, second):
            HalfSilentJudge.calls += 1
            return (math.nan if HalfSilentJudge.calls % 2 else 0.0), {"top_logprobs": []}

    monkeypatch.setattr(alpaca_eval, "make_preference_judge", lambda *a: HalfSilentJudge())
    settings = {"seed": 1, "judge": {"type": "api", "model": "gpt-4-turbo", "base_url": "http://localhost:1"}}
    judge_outputs(settings, str(outputs), str(reference), str(tmp_path / "a.json"), str(tmp_path / "m.json"),
                  str(tmp_path / "c.jsonl"))
    annotations = json.loads((tmp_path / "a.json").read_text())
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert sum(row["preference"] is None for row in annotations) == 2
    assert metrics["n_missing"] == 2 and metrics["n_total"] == 2
    assert metrics["reference_generator"] == "self_instruct-round1"


def test_judge_outputs_needs_a_reference_for_every_instruction(tmp_path):
    from montessori.errors import DataError

    outputs, reference = tmp_path / "outputs.json", tmp_path / "reference.json"
    _outputs(outputs, 3)
    _outputs(reference, 2)
    with pytest.raises(DataError, match="no reference output"):
        judge_outputs({"judge": {"type": "local"}}, str(outputs), str(reference), str(tmp_path / "a.json"),
                      str(tmp_path / "m.json"), str(tmp_path / "c.jsonl"))


def test_reads_the_public_alpaca_eval_set(shared_data):
    rows = alpaca_eval.read_alpaca_rows(shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json")
    assert len(rows) == 805 and {r["generator"] for r in rows} == {"gpt4_1106_preview"}


def test_malformed_rows_are_named(tmp_path):
    from montessori.errors import DataError

    path = tmp_path / "outputs.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(DataError, match=r"outputs.json row 2: lacks string field\(s\) \['output'\]"):
        alpaca_eval.read_alpaca_rows(path)


def test_api_judge_asks_the_annotator_and_keeps_judgements_when_the_endpoint_hangs(tmp_path, monkeypatch):
    """AlpacaEval 2's annotator against an HTTP endpoint on 127.0.0.1: the first two comparisons
    are answered, then the server stops answering. The stage fails with a clear error and the two
    judgements stay cached; the rerun asks only for the rest."""
    from test_eval_openai_client import Server

    from montessori import openai_client
    from montessori.openai_client import EndpointError

    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    openai_client._client.cache_clear()
    outputs = tmp_path / "outputs.json"
    _outputs(outputs, 4)
    answer = (200, {}, {**_logprob_response([("m", math.log(0.7)), ("M", math.log(0.3))]),
                        "id": "c", "object": "chat.completion", "created": 0, "model": "judge"})
    answer[2]["choices"][0]["finish_reason"] = "length"
    hanging = Server([answer, answer])
    paths = {"annotations": str(tmp_path / "a.json"), "metrics": str(tmp_path / "m.json"),
             "cache": str(tmp_path / "c.jsonl")}

    def settings(url):
        return {"seed": 5, "judge": {"type": "api", "model": "judge", "base_url": url, "api_key_env": "JUDGE_KEY",
                                     "request_timeout": 0.5, "max_retries": 0},
                "alpaca_eval": {"position_bias_sample": 0}}

    try:
        with pytest.raises(EndpointError, match="did not answer within 0.5 s"):
            judge_outputs(settings(hanging.url), str(outputs), str(EVAL_SET), **paths)
    finally:
        hanging.close()
    assert len(Path(paths["cache"]).read_text().splitlines()) == 2
    assert not Path(paths["metrics"]).exists()
    request = hanging.requests[0]["body"]
    annotator = judges.alpaca_eval_annotator()
    assert request["model"] == "judge" and request["logprobs"] is True and request["top_logprobs"] == 5
    assert request["messages"][0]["content"] in annotator["prompt_template"]

    # the same endpoint again (the cache is per judge model and endpoint), now answering
    answering = Server([], default=answer, port=hanging.httpd.server_address[1])
    try:
        judge_outputs(settings(answering.url), str(outputs), str(EVAL_SET), **paths)
    finally:
        answering.close()
    assert len(answering.requests) == 2
    annotations = json.loads(Path(paths["annotations"]).read_text())
    for row in annotations:  # P(first shown) = .7 every time
        assert row["preference"] == pytest.approx(1.7 if row["is_switched_outputs"] else 1.3)
    assert json.loads(Path(paths["metrics"]).read_text())["annotator"].endswith(judges.ALPACA_EVAL_ANNOTATOR)


def test_the_reference_method_draws_with_itself_without_a_judge(tmp_path, monkeypatch):
    outputs = tmp_path / "outputs.json"
    _outputs(outputs, 3, generator="self_instruct-round1")
    monkeypatch.setattr(alpaca_eval, "make_preference_judge", lambda *a: pytest.fail("judged a draw"))
    settings = {"seed": 1, "judge": {"type": "api", "model": "judge", "base_url": "http://127.0.0.1:1/v1"},
                "alpaca_eval": {"position_bias_sample": 8}}
    judge_outputs(settings, str(outputs), str(outputs), str(tmp_path / "a.json"), str(tmp_path / "m.json"),
                  str(tmp_path / "c.jsonl"), reference_name="self_instruct")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["win_rate"] == 50.0 and metrics["length_controlled_minimal"] == 50.0
    assert metrics["reference"] == "self_instruct" and metrics["n_draws"] == 3 and metrics["position_bias_n"] == 0


def _length_control_files(tmp_path, n_rows):
    """A synthetic instruction_difficulty.csv and df_gamed.csv in alpaca_eval's layout."""
    difficulty = tmp_path / "instruction_difficulty.csv"
    difficulty.write_text("index,instruction_difficulty\n" + "".join(f"{i},{0.1 * (i % 4)}\n" for i in range(n_rows)))
    gamed = tmp_path / "df_gamed.csv"
    lines = ["index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline,model"]
    for i in range(n_rows):
        for model, sign in (("gamed_long", 1), ("gamed_short", -1)):
            lines.append(f"{i},{0.5 - 0.3 * sign},{1.2 * sign},{0.1 * (i % 4)},False,{model}")
    gamed.write_text("\n".join(lines) + "\n")
    return difficulty, gamed


def test_full_length_control_with_alpaca_eval_files(tmp_path, monkeypatch):
    rows = json.loads(EVAL_SET.read_text())
    difficulty, gamed = _length_control_files(tmp_path, len(rows))
    outputs = tmp_path / "outputs.json"
    _outputs(outputs, len(rows))

    class LengthLovingJudge:
        def judge(self, instruction, first, second):
            return (0.8 if len(first) > len(second) else 0.3), {}

    monkeypatch.setattr(alpaca_eval, "make_preference_judge", lambda *a: LengthLovingJudge())
    settings = {"seed": 1, "judge": {"type": "api", "model": "judge", "base_url": "http://127.0.0.1:1/v1"},
                "alpaca_eval": {"source": str(EVAL_SET), "instruction_difficulty": str(difficulty),
                                "gamed_annotations": str(gamed)}}
    judge_outputs(settings, str(outputs), str(EVAL_SET), str(tmp_path / "a.json"), str(tmp_path / "m.json"),
                  str(tmp_path / "c.jsonl"))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["length_control"] == "length_controlled_v1" and "length_controlled_minimal" not in metrics
    assert 0 < metrics["length_controlled_winrate"] < 100

    # one file without the other is a configuration error, never a silently reduced formula
    from montessori.errors import ConfigError

    del settings["alpaca_eval"]["gamed_annotations"]
    with pytest.raises(ConfigError, match="gamed_annotations"):
        judge_outputs(settings, str(outputs), str(EVAL_SET), str(tmp_path / "a.json"), str(tmp_path / "m.json"),
                      str(tmp_path / "c.jsonl"))
    # difficulties for another set than the evaluation source are refused
    settings["alpaca_eval"]["gamed_annotations"] = str(gamed)
    (tmp_path / "short").mkdir()
    short, _ = _length_control_files(tmp_path / "short", 2)
    settings["alpaca_eval"]["instruction_difficulty"] = str(short)
    with pytest.raises(ConfigError, match="not that set"):
        judge_outputs(settings, str(outputs), str(EVAL_SET), str(tmp_path / "a.json"), str(tmp_path / "m.json"),
                      str(tmp_path / "c.jsonl"))


def test_paper_reference_instructions_are_not_evaluated(tmp_path, shared_data):
    from montessori.data import build_reference_set

    source = shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json"
    reference = tmp_path / "reference.jsonl"
    build_reference_set({"kind": "paper", "source": str(source), "allow_eval_contamination": True}, str(reference))
    rows = alpaca_eval.read_alpaca_rows(source, need_output=False)
    selected, record = alpaca_eval.select_rows(rows, None, str(reference))
    held_out = {json.loads(line)["instruction"] for line in reference.read_text().splitlines()}
    assert record == {"in_source": 805, "excluded_as_reference": 256, "evaluated": 549,
                      "reason": record["reason"]} and "influence reference set" in record["reason"]
    assert not {row["instruction"].strip() for row in selected} & held_out
    assert [row["instruction"] for row in selected] == [row["instruction"] for row in rows[256:]]
    limited, record = alpaca_eval.select_rows(rows, 10, str(reference))
    assert limited == selected[:10] and record["evaluated"] == 10   # the limit counts remaining rows
    everything, record = alpaca_eval.select_rows(rows, None, None)
    assert len(everything) == 805 and record["excluded_as_reference"] == 0 and "reason" not in record


def test_generate_outputs_leaves_out_the_reference_and_records_it(tmp_path, tiny_model_dir):
    card = tmp_path / "student.json"
    write_model_card(card, tiny_model_dir)
    source = json.loads(EVAL_SET.read_text())
    reference = tmp_path / "reference.jsonl"
    reference.write_text(json.dumps({"id": "r", "instruction": source[0]["instruction"], "response": "x"}) + "\n")
    out, selection = tmp_path / "outputs.json", tmp_path / "selection.json"
    settings = {"seed": 3, "backend": "transformers", "batch_size": 2,
                "alpaca_eval": {"source": str(EVAL_SET), "limit": 2, "max_new_tokens": 2}}
    generate_outputs(settings, str(card), str(out), "base", selection=str(selection), exclude=str(reference))
    assert [r["instruction"] for r in json.loads(out.read_text())] == [r["instruction"] for r in source[1:3]]
    assert json.loads(selection.read_text())["excluded_as_reference"] == 1
