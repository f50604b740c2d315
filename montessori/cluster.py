"""Where a job runs on a SLURM cluster: the site's names and what each rule asks `sbatch` for.

The rules, not a profile, say which jobs want GPUs and how many (`gpu_job` / `cpu_job` in their
`resources:`), so that any site profile that sets `executor: slurm` and an account submits GPU
jobs right. Why not the workflow profile (profiles/default): Snakemake takes a key such as
`set-resources` or `default-resources` from the workflow profile *whole* and drops the same key
of the `--profile` (configargparse reads the workflow profile first and skips keys already
given), so a site's own `default-resources` (its account) would silently vanish.

Site names (account, partitions, GPU model, CPUs per GPU) come from the config (`compute.slurm`)
or, when the config leaves one out, from the environment variables of `SITE_KEYS`. A name nobody
set is left out of the job's resources, so the site profile's `default-resources` supply it; only
the GPU partition is required, and only when jobs go to SLURM (`require_gpu_partition`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .errors import ConfigError

# config key (under compute.slurm) -> (environment variable, meaning, default)
SITE_KEYS: dict[str, tuple[str, str, str | int | None]] = {
    "account": ("MONTESSORI_SLURM_ACCOUNT", "the SLURM account jobs are charged to (sbatch -A)", None),
    "cpu_partition": ("MONTESSORI_SLURM_CPU_PARTITION", "the partition for CPU jobs (sbatch -p)", None),
    "gpu_partition": ("MONTESSORI_SLURM_GPU_PARTITION", "the partition for GPU jobs (sbatch -p)", None),
    "gpu_model": ("MONTESSORI_SLURM_GPU_MODEL", "the GRES type of the GPUs (`sinfo -o '%P %G'`; empty: untyped)",
                  "h100"),
    "cpus_per_gpu": ("MONTESSORI_SLURM_CPUS_PER_GPU", "CPUs a GPU job gets per GPU", 8),
}


@dataclass(frozen=True)
class Site:
    account: str | None = None
    cpu_partition: str | None = None
    gpu_partition: str | None = None
    gpu_model: str = "h100"          # "" for a site whose GPU GRES has no type
    cpus_per_gpu: int = 8


def _source(key: str) -> str:
    variable = SITE_KEYS[key][0]
    return f"config key 'compute.slurm.{key}' (or the environment variable {variable})"


def site_settings(config_slurm: Mapping | None, environ: Mapping[str, str] | None = None) -> Site:
    """The site's names: a config key wins over its environment variable; blank means unset."""
    config_slurm = config_slurm or {}
    environ = os.environ if environ is None else environ
    unknown = sorted(set(config_slurm) - set(SITE_KEYS))
    if unknown:
        raise ConfigError(f"config key 'compute.slurm.{unknown[0]}' is unknown; known: {', '.join(SITE_KEYS)}")
    values = {}
    for key, (variable, meaning, default) in SITE_KEYS.items():
        value = config_slurm.get(key)
        if value is None:
            value = environ.get(variable)
        value = None if value is None else str(value).strip()
        if key == "gpu_model":
            # An empty GPU model is meaningful (untyped GRES); only "not given" takes the default.
            values[key] = default if value is None else value
        elif key == "cpus_per_gpu":
            text = str(default) if not value else value
            if not text.isdigit() or int(text) < 1:
                raise ConfigError(f"{_source(key)} must be a positive whole number ({meaning}), got {text!r}")
            values[key] = int(text)
        else:
            values[key] = value or None
    return Site(**values)


def _missing_gpu_partition() -> ConfigError:
    variable, meaning, _ = SITE_KEYS["gpu_partition"]
    return ConfigError(
        f"GPU jobs on SLURM need {meaning}: set {_source('gpu_partition')}, "
        f"e.g. `export {variable}=gpu`; profiles/slurm/README.md lists every key a site sets."
    )


def require_gpu_partition(site: Site, executor: Callable[[], str | None]) -> Callable:
    """The GPU partition as a resource function, evaluated once Snakemake knows its executor (at
    parse time it does not): required when submitting to SLURM, empty for a local run or the job
    step inside SLURM. The workflow's onstart evaluates every planned job's resources, so a
    missing partition stops the run before the first submission."""

    def gpu_partition(wildcards) -> str:
        if site.gpu_partition:
            return site.gpu_partition
        if executor() == "slurm":
            raise _missing_gpu_partition()
        return ""

    return gpu_partition


def cpu_job(site: Site) -> dict:
    """Resources of a job without GPUs: the CPU partition and account when the site named them
    here, else nothing, so that the site profile's default-resources apply."""
    resources = {}
    if site.account:
        resources["slurm_account"] = site.account
    if site.cpu_partition:
        resources["slurm_partition"] = site.cpu_partition
    return resources


def gpu_job(site: Site, gpus: int, executor: Callable[[], str | None]) -> dict:
    """Resources of a job on `gpus` GPUs (0: a CPU job, as on a laptop or CI): the plugin's own
    keys (`gpu`, `gpu_model`, `cpus_per_gpu`; never --gres in slurm_extra, which it rejects), on
    one node, since a multi-GPU job runs `accelerate launch` on one machine and `--gpus=N` alone
    would let SLURM spread the N GPUs over several nodes."""
    if not isinstance(gpus, int) or gpus < 0:
        raise ConfigError(f"a job's GPU count must be a whole number >= 0, got {gpus!r}")
    if gpus == 0:
        return cpu_job(site)
    resources = cpu_job(site) | {"gpu": gpus, "cpus_per_gpu": site.cpus_per_gpu, "nodes": 1,
                                 "slurm_partition": require_gpu_partition(site, executor)}
    if site.gpu_model:
        resources["gpu_model"] = site.gpu_model
    return resources


# ---- installing our site profile under the name `slurm` -------------------------------------
PROFILE_SOURCE = Path(__file__).resolve().parents[1] / "profiles" / "slurm"
PROFILE_NAME = "slurm"


def user_profiles_dir() -> Path:
    """The folder where `snakemake --profile NAME` looks for NAME after the working directory:
    Snakemake's own platformdirs lookup (honours XDG_CONFIG_HOME; ~/.config/snakemake on Linux)."""
    from snakemake.common import get_appdirs

    return Path(get_appdirs().user_config_dir)


def install_profile(force: bool = False, profiles_dir: Path | None = None, source: Path = PROFILE_SOURCE) -> Path:
    """Copy profiles/slurm to `<profiles_dir>/slurm`; an existing profile of that name is kept
    unless `force`. The copy is made beside the target and renamed into place, so an
    interrupted install never leaves half a profile."""
    if not (source / "config.yaml").is_file():
        raise ConfigError(f"{source / 'config.yaml'} not found: run install-profile from a clone of the project "
                          f"(the package must be installed with `pip install -e .`)")
    target = (profiles_dir or user_profiles_dir()) / PROFILE_NAME
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists (a site's own `slurm` profile?): left as it is. "
                          f"Add --force to replace it, or keep it and only set `executor: slurm` and the "
                          f"account in it: the workflow supplies what each job needs.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{PROFILE_NAME}.", dir=target.parent))
    try:
        for name in ("config.yaml", "README.md"):
            shutil.copy2(source / name, staging / name)
        if target.exists():
            retired = target.with_name(f".{PROFILE_NAME}.replaced")
            shutil.rmtree(retired, ignore_errors=True)
            target.rename(retired)
            shutil.rmtree(retired)
        staging.chmod(0o755)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def install_profile_main(argv: list[str]) -> int:
    """`python -m montessori install-profile [--force]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m montessori install-profile",
        description="Install profiles/slurm as the Snakemake profile `slurm` (for `snakemake --profile slurm`).")
    parser.add_argument("--force", action="store_true", help="replace an existing profile named slurm")
    args = parser.parse_args(argv)
    try:
        target = install_profile(force=args.force)
    except ConfigError as err:
        print(f"install-profile: {err}", file=sys.stderr)
        return 2
    print(f"installed {target}; run `snakemake --profile {PROFILE_NAME}` from the project root")
    return 0
