"""lm-evaluation-harness on a student checkpoint: the `hf` backend on CPU, `vllm` on GPU.

Tasks come from lm-eval's registry plus the YAML files under `include_path` (the embedded
default's local tasks read their data with `dataset_path: json` and paths relative to the
project root, where the pipeline runs). Tasks are grouped by shot count and evaluated on one
loaded model; the parsed results (metric values and their standard errors per task) go to `out`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import yaml

from ..errors import ConfigError, DataError
from ..io import write_json_atomic
from ..models import model_path
from ..seeding import derive_seed

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "vllm")


class _LenientLoader(yaml.SafeLoader):
    """Reads lm-eval YAML for a quick look: `!function` and other tags come back as plain values."""


_LenientLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def local_task_files(include_path: str) -> dict[str, Path]:
    """Task name -> YAML file, for the task definitions under `include_path`."""
    found = {}
    for path in sorted(Path(include_path).rglob("*.yaml")):
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=_LenientLoader)
        except yaml.YAMLError as err:
            raise DataError(f"{path}: not valid YAML ({err})") from None
        if isinstance(config, dict) and isinstance(config.get("task"), str):
            found[config["task"]] = path
    return found


def make_task_manager(include_path: str | None, tasks, local: dict[str, Path]):
    """lm-eval's task index. Built, it reads every task YAML it may need: its own (14,685 tasks in
    lm-eval 0.4.13, about 4 s of CPU per evaluation job, measured idle on 2 cores) unless every
    configured task is a local one (`local`: local_task_files), in which case only `include_path`
    is indexed (a local YAML's `include:` is read by path, not looked up in the index)."""
    from lm_eval.tasks import TaskManager

    if not include_path:
        return TaskManager()
    return TaskManager(include_path=include_path, include_defaults=not all(task in local for task in tasks))


def check_local_data(task: str, yaml_path: Path) -> None:
    """A local json task's data files must exist (relative to the working directory, as lm-eval reads them)."""
    config = yaml.load(yaml_path.read_text(encoding="utf-8"), Loader=_LenientLoader)
    if config.get("dataset_path") != "json":
        return
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(data_files, str):
        data_files = [data_files]
    elif isinstance(data_files, dict):
        data_files = [f for files in data_files.values() for f in ([files] if isinstance(files, str) else files)]
    for file in data_files or []:
        if not Path(file).exists():
            raise DataError(f"{yaml_path}: task '{task}' reads {file}, which does not exist under {Path.cwd()} "
                            f"(lm-eval runs from the project root)")


def _make_lm(backend: str, path: str, batch_size, settings: dict):
    from lm_eval.api.registry import get_model

    if backend == "hf":
        import torch

        args = {"pretrained": path, "dtype": "float32", "batch_size": batch_size,
                "device": "cuda" if torch.cuda.is_available() else "cpu"}
    else:
        from ..generation import vllm_enforce_eager

        args = {"pretrained": path, "batch_size": batch_size, "dtype": "auto",
                "gpu_memory_utilization": float(settings.get("gpu_memory_utilization", 0.9)),
                "enforce_eager": vllm_enforce_eager()}
    return get_model(backend).create_from_arg_obj(args)


def parse_results(results: dict, shots: dict[str, int]) -> dict:
    """{task: {"num_fewshot", "metrics": {"acc": x, "acc_stderr": y, "exact_match,strict-match": ...},
    "n_samples"}} from lm-eval's result dict (a filter named `none` is left out of the key)."""
    parsed = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            metrics[metric if filter_name == "none" else key] = float(value)
        n_samples = results.get("n-samples", {}).get(task, {})
        parsed[task] = {"num_fewshot": shots.get(task), "metrics": metrics,
                        "n_samples": n_samples.get("effective", n_samples.get("original"))}
    return parsed


def run_lm_eval(settings: dict, student: str, out: str, name: str) -> None:
    """The configured lm-eval tasks on the student (stage `eval_score`, after the NLL).

    settings: {"seed", "backend" (auto | transformers | vllm), "gpu_memory_utilization",
               "lm_eval": {"include_path", "tasks": [{"name", "num_fewshot"}], "limit", "batch_size",
                           "apply_chat_template" (false)}}
    """
    from lm_eval import simple_evaluate

    section = settings.get("lm_eval", {})
    tasks = section.get("tasks") or []
    if not tasks:
        raise ConfigError("config key 'evaluation.lm_eval.tasks' is empty")
    by_shots: dict[int, list[str]] = defaultdict(list)
    shots = {}
    for task in tasks:  # each an object with a name: the config schema checked them
        shots[task["name"]] = int(task.get("num_fewshot", 0))
        by_shots[shots[task["name"]]].append(task["name"])
    include_path = section.get("include_path")
    local = local_task_files(include_path) if include_path else {}
    for task_name in shots:
        if task_name in local:
            check_local_data(task_name, local[task_name])
    backend = settings.get("backend", "auto")
    if backend == "auto":
        from ..generation import vllm_available

        backend = "vllm" if vllm_available() else "hf"
    backend = {"transformers": "hf"}.get(backend, backend)
    if backend not in BACKENDS:
        raise ConfigError(f"config key 'backend': {backend!r} is not one of auto, transformers, vllm")
    path = model_path(student)
    limit = section.get("limit")
    batch_size = section.get("batch_size", 1)
    log.info("lm_eval %s: backend %s, tasks %s, limit %s", name, backend, shots, limit)
    lm = _make_lm(backend, path, batch_size, settings)
    task_manager = make_task_manager(include_path, shots, local)
    seed = derive_seed(settings.get("seed", 0), "lm_eval")
    parsed: dict = {}
    versions: dict = {}
    for num_fewshot, names in sorted(by_shots.items()):
        log.info("lm_eval %s: %s at %d shot(s)", name, names, num_fewshot)
        results = simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
            log_samples=False, apply_chat_template=bool(section.get("apply_chat_template", False)),
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
        if results is None:
            raise DataError(f"lm-eval returned no results for tasks {names}")
        parsed.update(parse_results(results, shots))
        versions.update(results.get("versions", {}))
    missing = [task for task in shots if task not in parsed]
    if missing:
        raise DataError(f"lm-eval results lack tasks {missing} (config key 'evaluation.lm_eval.tasks')")
    write_json_atomic(out, {"model": name, "model_path": path, "backend": backend, "limit": limit,
                            "tasks": parsed, "versions": versions})
    for task, result in parsed.items():
        log.info("lm_eval %s: %s %s", name, task, result["metrics"])
