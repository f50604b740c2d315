import json

import pytest

from montessori.data import build_reference_set, build_seed_pool, load_pairs
from montessori.errors import ConfigError, DataError
from montessori.io import read_jsonl


def _seed(tmp_path, rows, name="seeds.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_seed_text_joins_instruction_and_input(tmp_path):
    source = _seed(tmp_path, [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a prime number.", "input": "", "output": "7"},
    ])
    out = tmp_path / "pool.jsonl"
    build_seed_pool({"source": source, "seed": 1}, str(out))
    texts = sorted(r["text"] for r in read_jsonl(out))
    assert texts == ["Name a prime number.", "Translate to French. Good morning"]
    assert all(r["id"].startswith("seed-") for r in read_jsonl(out))


def test_seed_pool_is_shuffled_with_the_seed(tmp_path):
    source = _seed(tmp_path, [{"instruction": f"Task number {i}."} for i in range(50)])
    outs = []
    for seed in (1, 1, 2):
        out = tmp_path / f"pool{len(outs)}.jsonl"
        build_seed_pool({"source": source, "seed": seed}, str(out))
        outs.append([r["id"] for r in read_jsonl(out)])
    assert outs[0] == outs[1] != outs[2]


def test_real_alpaca_slice(tmp_path, shared_data):
    out = tmp_path / "pool.jsonl"
    build_seed_pool({"source": str(shared_data / "seeds" / "alpaca_gpt4_demo_1k.json"), "seed": 0, "limit": 100}, str(out))
    records = read_jsonl(out)
    assert len(records) == 100 and len({r["id"] for r in records}) == 100


@pytest.mark.parametrize("rows, message", [
    ([{"instruction": "ok"}, {"input": "no instruction"}], r"seeds.jsonl:2: missing or empty 'instruction'"),
    ([{"instruction": "ok"}, {"instruction": "  "}], r"seeds.jsonl:2: missing or empty 'instruction'"),
    ([], r"seed pool is empty"),
])
def test_seed_errors_name_file_and_line(tmp_path, rows, message):
    source = _seed(tmp_path, rows)
    with pytest.raises(DataError, match=message):
        build_seed_pool({"source": source, "seed": 0}, str(tmp_path / "pool.jsonl"))
    assert not (tmp_path / "pool.jsonl").exists()


# OpenAssistant/oasst1's schema (one row per message of a conversation tree), made-up rows.
OASST_ROWS = [
    {"message_id": "m1", "parent_id": None, "role": "prompter", "lang": "en", "text": "How do tides work?"},
    {"message_id": "m2", "parent_id": "m1", "role": "assistant", "lang": "en", "text": "The moon pulls..."},
    {"message_id": "m3", "parent_id": "m2", "role": "prompter", "lang": "en", "text": "And the sun?"},
    {"message_id": "m4", "parent_id": None, "role": "prompter", "lang": "de", "text": "Wie spät ist es?"},
    {"message_id": "m5", "parent_id": None, "role": "prompter", "lang": "en", "text": "Write a haiku about rain."},
]
OASST_SETTINGS = {"fields": {"instruction": "text", "input": None},
                  "where": {"role": "prompter", "parent_id": None, "lang": "en"}}


def test_a_message_tree_gives_its_first_user_turns_as_seeds(tmp_path):
    """The seed-data ablation's pool (presets/seed-ablation-oasst.yaml): fields mapped, rows selected."""
    out = tmp_path / "pool.jsonl"
    build_seed_pool({"source": _seed(tmp_path, OASST_ROWS), "seed": 0, **OASST_SETTINGS}, str(out))
    assert sorted(r["text"] for r in read_jsonl(out)) == ["How do tides work?", "Write a haiku about rain."]


def test_the_ablation_preset_maps_the_same_fields():
    from pipeline_helpers import ROOT
    from montessori.config import load_config

    config = load_config(ROOT / "config.yaml", ROOT / "presets" / "llama3-8b.yaml",
                         ROOT / "presets" / "seed-ablation-oasst.yaml")
    assert config["seed_pool"]["source"] == "OpenAssistant/oasst1"
    assert {key: config["seed_pool"][key] for key in OASST_SETTINGS} == OASST_SETTINGS


def test_a_mapped_field_missing_or_a_where_field_nobody_has_names_the_key(tmp_path):
    source = _seed(tmp_path, OASST_ROWS)
    with pytest.raises(DataError, match=r"seeds.jsonl:1: missing or empty 'prompt'.*seed_pool.fields.instruction"):
        build_seed_pool({"source": source, "seed": 0, "fields": {"instruction": "prompt"}}, str(tmp_path / "p.jsonl"))
    with pytest.raises(ConfigError, match=r"config key 'seed_pool.where': no row of .* has a field 'language'"):
        build_seed_pool({"source": source, "seed": 0, **OASST_SETTINGS, "where": {"language": "en"}},
                        str(tmp_path / "p.jsonl"))
    with pytest.raises(DataError, match=r"seed pool is empty.*seed_pool.where"):
        build_seed_pool({"source": source, "seed": 0, **OASST_SETTINGS, "where": {"lang": "fr"}},
                        str(tmp_path / "p.jsonl"))


def test_malformed_seed_line(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"instruction": "fine"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"seeds.jsonl:2: not valid JSON"):
        build_seed_pool({"source": str(path), "seed": 0}, str(tmp_path / "pool.jsonl"))


def test_json_list_and_missing_file(tmp_path):
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps([{"instruction": "a"}, {"instructions": "b"}]))
    with pytest.raises(DataError, match=r"seeds.json row 2"):
        build_seed_pool({"source": str(path), "seed": 0}, str(tmp_path / "pool.jsonl"))
    with pytest.raises(DataError, match="file not found"):
        build_seed_pool({"source": str(tmp_path / "nope.jsonl"), "seed": 0}, str(tmp_path / "pool.jsonl"))


def test_reference_set_refuses_eval_overlap_unless_allowed(tmp_path):
    reference = _seed(tmp_path, [{"instruction": "Say hi.", "response": "Hi!"},
                                 {"instruction": "Say bye.", "response": "Bye!"}], "ref.jsonl")
    eval_set = tmp_path / "eval.json"
    eval_set.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hello"}]))
    out = tmp_path / "reference.jsonl"
    settings = {"source": reference, "eval_sources": [str(eval_set)]}
    with pytest.raises(DataError, match="allow_eval_contamination"):
        build_reference_set(settings, str(out))
    build_reference_set({**settings, "allow_eval_contamination": True}, str(out))
    assert len(read_jsonl(out)) == 2


def test_load_pairs_accepts_alpaca_fields(tmp_path):
    source = _seed(tmp_path, [{"instruction": "Add", "input": "2+2", "output": "4"}])
    assert load_pairs(source) == [{"id": "ref-00000", "instruction": "Add 2+2", "response": "4"}]


# --- reference set kinds: `paper` (the original's) and `clean` (held out of the seed dataset) ---

# The original's reference order, read from its data/reference_dataset with datasets'
# Dataset.shuffle(seed=42): the positions, in AlpacaEval's file order, of its first rows.
ORIGINAL_FIRST_ROWS = [168, 26, 239, 179, 245, 227, 128, 3, 210, 38]


def _eval_prompts(shared_data) -> set[str]:
    from montessori.data import eval_instructions

    gsm8k = {json.loads(line)["question"].strip()
             for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines() if line.strip()}
    return (eval_instructions(str(shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json"))
            | eval_instructions(str(shared_data / "mt_bench" / "question.jsonl")) | gsm8k)


def test_paper_reference_is_the_originals_256_rows_in_its_order(tmp_path, shared_data):
    source = shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json"
    rows = json.loads(source.read_text())
    out = tmp_path / "reference.jsonl"
    settings = {"kind": "paper", "source": str(source), "eval_sources": [str(source)], "seed": 7}
    with pytest.raises(DataError, match="allow_eval_contamination"):
        build_reference_set(settings, str(out))
    build_reference_set({**settings, "allow_eval_contamination": True}, str(out))
    reference = read_jsonl(out)
    assert len(reference) == 256
    assert {r["instruction"] for r in reference} == {r["instruction"].strip() for r in rows[:256]}
    assert [r["id"] for r in reference[:10]] == [f"alpaca_eval-{i:03d}" for i in ORIGINAL_FIRST_ROWS]
    assert reference[0]["response"] == rows[168]["output"]  # GPT-4 Turbo's answer, as the original's
    assert sum(len(r["response"]) for r in reference) / 256 > 2000


def test_clean_reference_is_disjoint_from_evaluation_sets_and_seed_pool(tmp_path, shared_data):
    seeds = str(shared_data / "seeds" / "alpaca_gpt4_demo_1k.json")
    eval_sources = [str(shared_data / "alpaca_eval" / "gpt4_1106_preview_outputs.json"),
                    str(shared_data / "mt_bench" / "question.jsonl")]
    reference_path, pool_path = tmp_path / "reference.jsonl", tmp_path / "pool.jsonl"
    settings = {"kind": "clean", "source": seeds, "size": 30, "min_response_chars": 1500, "seed": 7,
                "eval_sources": eval_sources}
    build_reference_set(settings, str(reference_path))
    reference = read_jsonl(reference_path)
    assert len(reference) == 30 and all(len(r["response"]) >= 1500 for r in reference)
    texts = {r["instruction"] for r in reference}
    assert not texts & _eval_prompts(shared_data)

    build_seed_pool({"source": seeds, "seed": 0}, str(pool_path), reference=str(reference_path))
    pool = {r["text"] for r in read_jsonl(pool_path)}
    assert not texts & pool
    build_seed_pool({"source": seeds, "seed": 0}, str(pool_path))
    assert len({r["text"] for r in read_jsonl(pool_path)}) == len(pool) + 30  # exactly the held-out rows

    again = tmp_path / "again.jsonl"
    build_reference_set(settings, str(again))
    assert read_jsonl(again) == reference                       # the held-out draw is seeded
    build_reference_set({**settings, "seed": 8}, str(again))
    assert {r["instruction"] for r in read_jsonl(again)} != texts


def test_clean_reference_names_the_keys_when_too_few_rows_qualify(tmp_path, shared_data):
    seeds = str(shared_data / "seeds" / "alpaca_gpt4_demo_1k.json")
    with pytest.raises(DataError, match="min_response_chars.*influence.reference.size asks for 500"):
        build_reference_set({"kind": "clean", "source": seeds, "size": 500, "min_response_chars": 2000},
                            str(tmp_path / "reference.jsonl"))
    assert not (tmp_path / "reference.jsonl").exists()
