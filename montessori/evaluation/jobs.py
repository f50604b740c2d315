"""The evaluation's three stages, one job each per student, grouped by the model they load.

Each process pays Python's start, the torch/transformers imports and a model load (on the
embedded default about 7 s, more than most benchmarks' own work; on a GPU, vLLM's engine start
is a minute). So a student's evaluation is one job per model, not one per benchmark:

- `eval_generate`: the student's generator, once, writes the AlpacaEval outputs and the MT-Bench
  answers;
- `eval_score`: the judge-free scores of the student: the NLL of held-out answers, then the
  lm-eval-harness tasks (lm-eval loads the student through its own backend, after the NLL's model
  is released, so that vLLM finds the GPU's memory free);
- `eval_judge`: the judge, once (judges.judge_model), rates the AlpacaEval outputs against every
  reference of `evaluation.alpaca_eval.reference` and grades the MT-Bench answers.

Each benchmark's files, seeds and caches are those of its own module; grouping changes no result.
"""

from __future__ import annotations

import gc

from ..errors import ConfigError
from . import alpaca_eval, lm_eval, mt_bench, nll


def generate(settings: dict, student: str, alpaca_out: str, selection: str, mt_bench_out: str, name: str,
             exclude: str | None = None) -> None:
    """Stage `eval_generate`. settings: those of alpaca_eval.generate_outputs and
    mt_bench.generate_answers (their `alpaca_eval` and `mt_bench` sections side by side)."""
    from ..generation import make_generator

    generator = make_generator(settings, student)
    alpaca_eval.generate_outputs(settings, student, alpaca_out, name, selection, exclude, generator=generator)
    mt_bench.generate_answers(settings, student, mt_bench_out, name, generator=generator)


def score(settings: dict, student: str, seed_pool: str, reference: str, nll_items: str, nll_summary: str,
          lm_eval_out: str, name: str) -> None:
    """Stage `eval_score`. settings: those of nll.evaluate_nll and lm_eval.run_lm_eval."""
    import torch

    nll.evaluate_nll(settings, student, seed_pool, reference, nll_items, nll_summary, name)
    gc.collect()  # the NLL's model is garbage once evaluate_nll returns: free its memory first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    lm_eval.run_lm_eval(settings, student, lm_eval_out, name)


def _comparisons(reference_paths: list[str], annotations_paths: list[str], metrics_paths: list[str],
                 cache_paths: list[str]) -> list[dict]:
    """One AlpacaEval comparison per `name=path` reference, with its files at the same position."""
    lengths = {len(reference_paths), len(annotations_paths), len(metrics_paths), len(cache_paths)}
    if len(lengths) != 1:
        raise ConfigError(f"eval_judge: {len(reference_paths)} references but {len(annotations_paths)} annotation, "
                          f"{len(metrics_paths)} metrics and {len(cache_paths)} cache files")
    comparisons = []
    for named, annotation, metrics, cache in zip(reference_paths, annotations_paths, metrics_paths, cache_paths):
        name, sep, path = named.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"eval_judge: reference {named!r} is not name=path")
        comparisons.append({"reference_name": name, "reference": path, "annotations": annotation,
                            "metrics": metrics, "cache": cache})
    return comparisons


def judge(settings: dict, outputs: str, reference_paths: list[str], annotations_paths: list[str],
          metrics_paths: list[str], cache_paths: list[str], answers: str, judgments: str, scores: str,
          mt_bench_cache: str, judge: str | None = None) -> None:
    """Stage `eval_judge`: AlpacaEval against each `name=path` of `reference_paths` (its
    annotations, metrics and cache at the same position of the other lists), then MT-Bench.
    `judge`: the judge's model card (judge type local). settings: those of
    alpaca_eval.judge_outputs and mt_bench.judge_answers."""
    for comparison in _comparisons(reference_paths, annotations_paths, metrics_paths, cache_paths):
        alpaca_eval.judge_outputs(settings, outputs, judge=judge, **comparison)
    mt_bench.judge_answers(settings, answers, judgments, scores, mt_bench_cache, judge=judge)
