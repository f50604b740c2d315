"""presets/study.yaml (docs/study.md): planned over the embedded default with its local data
override, and that override's split of the Alpaca-GPT4 slice into seeds, reference pairs and
held-out NLL items, made by the pipeline's own stage functions."""

from __future__ import annotations

import pytest
from pipeline_helpers import ROOT, job_stats, make_workdir, run_snakemake
from test_pipeline import expected_job_counts

from montessori.config import load_config
from montessori.data import build_reference_set, build_seed_pool
from montessori.evaluation.nll import held_out_items
from montessori.io import read_jsonl

PRESETS = ("presets/study.yaml", "presets/study-local.yaml")


@pytest.fixture(scope="module")
def study_config():
    return load_config(ROOT / "config.yaml", *(ROOT / preset for preset in PRESETS))


def test_the_study_plans_two_rounds_of_both_methods(tmp_path, study_config):
    workdir = make_workdir(tmp_path / "work")
    (workdir / "presets").symlink_to(ROOT / "presets")
    (tmp_path / "shared").symlink_to(ROOT.parent / "shared")    # ../shared/data, as beside a clone
    dry = run_snakemake(workdir, "--workflow-profile", "none", "--dry-run", "--configfile", *PRESETS)
    assert dry.returncode == 0, dry.stdout[-3000:]
    assert job_stats(dry.stdout) == expected_job_counts(study_config)
    assert study_config["rounds"] == 2 and study_config["methods"] == ["montessori", "self_instruct"]


def test_the_local_override_reads_shared_data_in_place(study_config):
    """Every data key the override sets points into ../shared/data (never a copy in the project)."""
    override = load_config(ROOT / "config.yaml", ROOT / "presets" / "study-local.yaml")
    sources = [override["seed_pool"]["source"], override["influence"]["reference"]["source"],
               override["evaluation"]["nll"]["source"], override["evaluation"]["alpaca_eval"]["source"],
               *(override["evaluation"]["mt_bench"][key] for key in ("questions", "reference_answers", "judge_prompts"))]
    assert all(source.startswith("../shared/data/") for source in sources)
    assert all((ROOT / source).is_file() for source in sources)


def test_the_local_split_keeps_seeds_references_and_nll_items_apart(tmp_path, study_config):
    """400 seeds, 16 long reference answers and 300 NLL items from the 999-row slice, disjoint: every
    NLL item is a row the teacher never saw and influence never scored."""
    config = study_config
    def in_project(section: dict, key: str = "source") -> dict:   # the pipeline's working directory
        return {**section, key: str(ROOT / section[key])}

    reference, seeds = tmp_path / "reference.jsonl", tmp_path / "seed_pool.jsonl"
    build_reference_set({**in_project(config["influence"]["reference"]), "seed": config["seed"],
                         "eval_sources": [str(ROOT / config["evaluation"]["alpaca_eval"]["source"]),
                                          str(ROOT / config["evaluation"]["mt_bench"]["questions"])]},
                        out=str(reference))
    build_seed_pool({**in_project(config["seed_pool"]), "seed": config["seed"]}, out=str(seeds),
                    reference=str(reference))
    references = {pair["instruction"] for pair in read_jsonl(reference)}
    seed_texts = {record["text"] for record in read_jsonl(seeds)}
    assert len(references) == config["influence"]["reference"]["size"] == 16
    assert all(len(pair["response"]) >= 1000 for pair in read_jsonl(reference))
    assert len(seed_texts) == config["seed_pool"]["limit"] == 400 and not references & seed_texts
    items, counts = held_out_items(in_project(config["evaluation"]["nll"]), str(seeds), str(reference))
    assert counts["evaluated"] == len(items) == 300
    assert not {item["instruction"] for item in items} & (seed_texts | references)
