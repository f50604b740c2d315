"""The conda environments (envs/*.yaml) stay in step with pyproject.toml, and the FSDP accelerate
configuration launches as many processes as the job was given GPUs, never a number of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / "envs"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Which pyproject extras each environment adds to the package's own dependencies.
ENV_EXTRAS = {"base": [], "training": []}
# These install requirements-vllm.txt's pins instead (tests/test_vllm_env.py checks them).
VLLM_ENVS = {"generation", "evaluation"}
# Snakemake runs the workflow, outside the rules' environments.
NOT_IN_RULE_ENVS = {"snakemake"}


def normalized(requirement: str) -> tuple[str, str]:
    parsed = Requirement(requirement)
    return parsed.name.lower().replace("_", "-"), str(parsed.specifier)


def pip_section(env_name: str) -> tuple[list[str], list[str]]:
    """(requirements, pip options) of envs/<env_name>.yaml."""
    spec = yaml.safe_load((ENVS / f"{env_name}.yaml").read_text())
    assert spec["name"] == f"montessori-{env_name}"
    assert "conda-forge" in spec["channels"]
    pip_lists = [item["pip"] for item in spec["dependencies"] if isinstance(item, dict)]
    assert len(pip_lists) == 1, f"envs/{env_name}.yaml: expected one pip section"
    assert "pip" in spec["dependencies"]
    assert any(str(item).startswith("python=") for item in spec["dependencies"])
    options = [line for line in pip_lists[0] if line.startswith("-")]
    return [line for line in pip_lists[0] if not line.startswith("-")], options


@pytest.mark.parametrize("env_name", sorted(ENV_EXTRAS))
def test_env_requirements_equal_pyproject(env_name):
    requirements, _ = pip_section(env_name)
    expected = [req for req in PYPROJECT["dependencies"] if normalized(req)[0] not in NOT_IN_RULE_ENVS]
    for extra in ENV_EXTRAS[env_name]:
        expected += PYPROJECT["optional-dependencies"][extra]
    assert sorted(map(normalized, requirements)) == sorted(map(normalized, expected))


def test_every_env_file_is_known():
    on_disk = {path.stem for path in ENVS.glob("*.yaml")} - {"accelerate_fsdp"}
    assert on_disk == set(ENV_EXTRAS) | VLLM_ENVS


def test_cpu_env_takes_the_cpu_torch_build():
    _, options = pip_section("base")
    assert options == ["--extra-index-url https://download.pytorch.org/whl/cpu"]
    for gpu_env in ("training", "generation", "evaluation"):
        assert pip_section(gpu_env)[1] == []


# Each launched process records the environment accelerate gave it (one file per rank: the
# processes' output would interleave).
PROBE = """
import json, os
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "ACCELERATE_USE_FSDP", "FSDP_VERSION",
        "FSDP_STATE_DICT_TYPE", "FSDP_CPU_RAM_EFFICIENT_LOADING", "ACCELERATE_MIXED_PRECISION"]
with open(f"probe-{os.environ['RANK']}.json", "w") as out:
    json.dump({key: os.environ.get(key) for key in keys}, out)
"""


def accelerate_launch(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ENVS / "accelerate_fsdp.yaml"),
         *args, str(probe)],
        check=False, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180,
    )


def test_accelerate_config_launches_one_fsdp2_process_per_gpu(tmp_path):
    result = accelerate_launch("--num_processes", "3", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout
    probes = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("probe-*.json"))]
    assert sorted(probe["RANK"] for probe in probes) == ["0", "1", "2"]
    assert {probe["WORLD_SIZE"] for probe in probes} == {"3"}
    ports = {probe["MASTER_PORT"] for probe in probes}
    assert len(ports) == 1 and ports != {"29500"}, "main_process_port 0 should pick a free port"
    assert {(p["ACCELERATE_USE_FSDP"], p["FSDP_VERSION"], p["FSDP_STATE_DICT_TYPE"],
             p["FSDP_CPU_RAM_EFFICIENT_LOADING"], p["ACCELERATE_MIXED_PRECISION"]) for p in probes} == {
        ("true", "2", "FULL_STATE_DICT", "true", "bf16")}


def test_accelerate_config_refuses_to_guess_the_process_count(tmp_path):
    result = accelerate_launch(tmp_path=tmp_path)
    assert result.returncode != 0
    assert "--num_processes" in result.stdout
    assert not list(tmp_path.glob("probe-*.json"))
