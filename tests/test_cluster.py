"""What each job asks SLURM for (montessori/cluster.py), installing our profile as `slurm`, and
how a site profile combines with the workflow profile: unit tests and dry runs, no SLURM needed
(tests/test_slurm_profiles.py submits for real)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml
from pipeline_helpers import ROOT, make_workdir, pipeline_env, planned_jobs, run_snakemake

from montessori import cluster
from montessori.config import load_config
from montessori.errors import ConfigError
from montessori.memory import rule_memory_mb

GPU_RULES = {"synth_instructions", "synth_responses", "warmup", "influence", "dpo_teacher", "sft_student",
             "eval_generate", "eval_score"}
JUDGE_RULES = {"eval_judge"}


def slurm_env_free(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in pipeline_env().items() if not key.startswith("MONTESSORI_SLURM_")}
    return env | extra


# ---- site settings ---------------------------------------------------------------------------
def test_a_config_key_wins_over_its_environment_variable():
    site = cluster.site_settings({"gpu_partition": "a100q"}, {"MONTESSORI_SLURM_GPU_PARTITION": "gpu",
                                                               "MONTESSORI_SLURM_ACCOUNT": " proj ",
                                                               "MONTESSORI_SLURM_CPUS_PER_GPU": "12"})
    assert site == cluster.Site(account="proj", cpu_partition=None, gpu_partition="a100q", gpu_model="h100",
                                cpus_per_gpu=12)


def test_blank_means_unset_but_an_empty_gpu_model_means_untyped():
    site = cluster.site_settings({}, {"MONTESSORI_SLURM_CPU_PARTITION": "  ", "MONTESSORI_SLURM_GPU_MODEL": ""})
    assert site.cpu_partition is None
    assert site.gpu_model == ""
    assert "gpu_model" not in cluster.gpu_job(site, 1, lambda: None)


@pytest.mark.parametrize("value", ["eight", "0"])
def test_a_bad_cpus_per_gpu_names_both_places_to_set_it(value):
    with pytest.raises(ConfigError, match=r"compute\.slurm\.cpus_per_gpu.*MONTESSORI_SLURM_CPUS_PER_GPU.*positive"):
        cluster.site_settings({}, {"MONTESSORI_SLURM_CPUS_PER_GPU": value})


def test_an_unknown_site_key_is_named():
    with pytest.raises(ConfigError, match=r"compute\.slurm\.partition' is unknown"):
        cluster.site_settings({"partition": "gpu"}, {})


# ---- job resources ---------------------------------------------------------------------------
def test_a_gpu_job_asks_in_the_plugins_own_keys_on_one_node():
    site = cluster.Site(account="proj", cpu_partition="cpu", gpu_partition="gpu", gpu_model="a100", cpus_per_gpu=6)
    resources = cluster.gpu_job(site, 4, lambda: "slurm")
    partition = resources.pop("slurm_partition")
    assert partition(SimpleNamespace()) == "gpu"
    assert resources == {"gpu": 4, "gpu_model": "a100", "cpus_per_gpu": 6, "nodes": 1, "slurm_account": "proj"}


def test_no_gpus_makes_a_cpu_job_and_unset_names_are_left_to_the_site_profile():
    site = cluster.Site(account="proj", cpu_partition="cpu", gpu_partition="gpu")
    assert cluster.gpu_job(site, 0, lambda: "slurm") == {"slurm_account": "proj", "slurm_partition": "cpu"}
    # Nothing named here: the site profile's default-resources (account, partition) apply.
    assert cluster.cpu_job(cluster.Site()) == {}


def test_the_gpu_partition_is_required_only_when_submitting_to_slurm():
    resources = cluster.gpu_job(cluster.Site(), 1, lambda: "slurm")
    with pytest.raises(ConfigError, match="MONTESSORI_SLURM_GPU_PARTITION.*profiles/slurm/README.md"):
        resources["slurm_partition"](SimpleNamespace())
    for executor in ("local", "slurm-jobstep", "dryrun", None):
        assert cluster.gpu_job(cluster.Site(), 1, lambda: executor)["slurm_partition"](SimpleNamespace()) == ""


# ---- the profiles ----------------------------------------------------------------------------
def test_the_workflow_profile_never_sets_resources():
    """Snakemake would take these keys whole from profiles/default and drop the site profile's."""
    workflow_profile = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    assert not {"default-resources", "set-resources", "resources"} & workflow_profile.keys()
    # Our site profile leaves per-rule needs to the rules too, so any site profile is as good.
    site_profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert "set-resources" not in site_profile
    assert not {key for key in site_profile["default-resources"] if "gpu" in key}


def install(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "montessori", "install-profile", *args], check=False, cwd=ROOT,
                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)


@pytest.mark.parametrize("xdg", [True, False], ids=["XDG_CONFIG_HOME", "HOME"])
def test_install_profile_puts_it_where_snakemake_looks_and_keeps_an_existing_one(tmp_path, xdg):
    env = {key: value for key, value in pipeline_env().items() if key != "XDG_CONFIG_HOME"} | {"HOME": str(tmp_path / "home")}
    if xdg:
        env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    target = (tmp_path / "xdg" if xdg else tmp_path / "home" / ".config") / "snakemake" / "slurm"

    first = install(env)
    assert first.returncode == 0, first.stdout
    assert str(target) in first.stdout
    assert (target / "config.yaml").read_text() == (ROOT / "profiles" / "slurm" / "config.yaml").read_text()
    assert (target / "README.md").is_file()

    (target / "config.yaml").write_text("executor: slurm\n")          # the site's own profile
    again = install(env)
    assert again.returncode == 2
    assert f"{target} already exists" in again.stdout and "--force" in again.stdout
    assert (target / "config.yaml").read_text() == "executor: slurm\n"

    forced = install(env, "--force")
    assert forced.returncode == 0, forced.stdout
    assert (target / "config.yaml").read_text() == (ROOT / "profiles" / "slurm" / "config.yaml").read_text()
    assert sorted(path.name for path in target.parent.iterdir()) == ["slurm"], "no staging copies left behind"


def test_snakemake_finds_the_installed_profile_by_name(tmp_path):
    """`snakemake --profile slurm`, literally, from a clone's root (a dry run: no SLURM needed)."""
    env = slurm_env_free(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "xdg"),
                         MONTESSORI_SLURM_ACCOUNT="proj", MONTESSORI_SLURM_CPU_PARTITION="cpu",
                         MONTESSORI_SLURM_GPU_PARTITION="gpu")
    workdir = make_workdir(tmp_path / "work")
    before = run_snakemake(workdir, "--profile", "slurm", "--dry-run", env=env)
    assert before.returncode != 0 and "profile directory given (slurm)" in before.stdout
    assert install(env).returncode == 0
    after = run_snakemake(workdir, "--profile", "slurm", "--dry-run", env=env)
    assert after.returncode == 0, after.stdout[-3000:]
    assert "Using profiles slurm and workflow specific profile profiles/default" in after.stdout
    jobs = planned_jobs(after.stdout)
    assert jobs and all(job.resources["slurm_account"] == "proj" for job in jobs if job.rule != "all")


# ---- a site's own profile plus our workflow profile, on the 8B preset ------------------------
SITE_PROFILE = {
    "executor": "slurm",
    "jobs": 50,
    "default-resources": {"slurm_account": "siteacct", "slurm_partition": "standard", "runtime": 30},
    # A site's per-rule override beats the rule (here a QoS and a longer run time for influence).
    "set-resources": {"influence": {"qos": "long", "runtime": 2880}},
}


@pytest.fixture(scope="module")
def preset_dry_run(tmp_path_factory):
    """The 8B preset planned through a site profile of another name, by a user who set only the
    GPU partition in the environment (its judge is an API: `evaluation.judge.type: api`)."""
    tmp_path = tmp_path_factory.mktemp("site-profile")
    profile = tmp_path / "xdg" / "snakemake" / "mysite"
    profile.mkdir(parents=True)
    (profile / "config.yaml").write_text(yaml.safe_dump(SITE_PROFILE))
    workdir = make_workdir(tmp_path / "work")
    (workdir / "presets").symlink_to(ROOT / "presets")
    env = slurm_env_free(XDG_CONFIG_HOME=str(tmp_path / "xdg"), MONTESSORI_SLURM_GPU_PARTITION="gpu",
                         MONTESSORI_SLURM_GPU_MODEL="a100")
    dry = run_snakemake(workdir, "--profile", "mysite", "--dry-run", "--configfile", "presets/llama3-8b.yaml",
                        env=env, timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:]
    return load_config(ROOT / "config.yaml", ROOT / "presets" / "llama3-8b.yaml"), planned_jobs(dry.stdout)


def test_a_site_profile_and_the_rules_combine(preset_dry_run):
    config, jobs = preset_dry_run
    assert {job.rule for job in jobs} >= GPU_RULES | JUDGE_RULES
    for job in jobs:
        if job.rule == "all":
            continue
        resources = job.resources
        assert resources["slurm_account"] == "siteacct", job          # the site's default-resources
        if job.rule in GPU_RULES:
            assert resources["slurm_partition"] == "gpu", job            # from the rules, over the site default
            assert (resources["gpu_model"], resources["cpus_per_gpu"], resources["nodes"]) == ("a100", "8", "1"), job
        else:
            assert resources["slurm_partition"] == "standard", job       # the site's default partition
            assert "gpu" not in resources and "gpu_model" not in resources, job
    influence = [job for job in jobs if job.rule == "influence"]
    assert {(job.resources["qos"], job.resources["runtime"]) for job in influence} == {("long", "2880")}
    gpus = {job.rule: int(job.resources.get("gpu", 0)) for job in jobs}
    assert gpus["warmup"] == gpus["sft_student"] == config["compute"]["training_gpus"]
    assert gpus["dpo_teacher"] == (config["dpo"]["gpus"] or config["compute"]["training_gpus"])
    assert gpus["influence"] == config["compute"]["gpus"] * config["influence"]["gpus_per_shard"]


def test_the_memory_requests_follow_the_model_size(preset_dry_run):
    config, jobs = preset_dry_run
    for rule, kind in {"warmup": "warmup", "influence": "influence", "dpo_teacher": "dpo", "sft_student": "sft"}.items():
        requested = {job.resources["mem_mb"] for job in jobs if job.rule == rule}
        assert requested == {str(rule_memory_mb(kind, config))}, rule


def sbatch_arguments(resources: dict[str, str]) -> str:
    """The sbatch options snakemake-executor-plugin-slurm builds for a job with these resources
    (its own code; the account and partition options as its executor formats them)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    typed = {key: int(value) if value.isdigit() else value for key, value in resources.items()}
    job = SimpleNamespace(resources=SimpleNamespace(**typed, get=typed.get), name="judge", threads=1,
                          is_group=lambda: False)
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "rule", "workdir": ".",
              "account": f"-A {typed['slurm_account']}", "partition": f"-p {typed['slurm_partition']}"}
    return get_submit_command(job, params) + set_gres_string(job)


def test_an_api_judge_is_a_cpu_job(preset_dry_run):
    """Issue 10 item 6: `evaluation.judge.type: api` waits on HTTP, on the CPU partition, no GPU."""
    config, jobs = preset_dry_run
    assert config["evaluation"]["judge"]["type"] == "api"
    judges = [job for job in jobs if job.rule in JUDGE_RULES]
    assert judges
    for job in judges:
        call = sbatch_arguments(job.resources)
        assert "-p standard" in call and "-A siteacct" in call, call
        assert "--gpus" not in call and "--gres" not in call and "gpu" not in call.replace("ntasks", ""), call
    generate = next(job for job in jobs if job.rule == "eval_generate")
    call = sbatch_arguments(generate.resources)
    assert "-p gpu" in call and "--gpus=a100:1" in call, call


def test_a_local_judge_is_a_gpu_job(tmp_path):
    config_file = tmp_path / "local-judge.yaml"
    config_file.write_text(yaml.safe_dump({"compute": {"gpus": 1}, "evaluation": {"judge": {"type": "local"}}}))
    workdir = make_workdir(tmp_path / "work")
    env = slurm_env_free(MONTESSORI_SLURM_GPU_PARTITION="gpu", MONTESSORI_SLURM_CPU_PARTITION="cpu")
    dry = run_snakemake(workdir, "--workflow-profile", "none", "--dry-run", "--configfile", "config.yaml",
                        str(config_file), env=env)
    assert dry.returncode == 0, dry.stdout[-3000:]
    judges = [job for job in planned_jobs(dry.stdout) if job.rule in JUDGE_RULES]
    assert judges and all((job.resources["gpu"], job.resources["slurm_partition"]) == ("1", "gpu") for job in judges)


def test_submitting_gpu_jobs_without_a_gpu_partition_stops_before_any_job(tmp_path):
    """A real (not dry) run with the slurm executor: the workflow's onstart evaluates the planned
    jobs' resources, and the GPU partition refuses before anything reaches sbatch."""
    config_file = tmp_path / "gpus.yaml"
    config_file.write_text(yaml.safe_dump({"compute": {"gpus": 1}}))
    workdir = make_workdir(tmp_path / "work")
    env = slurm_env_free(MONTESSORI_SLURM_ACCOUNT="proj", MONTESSORI_SLURM_CPU_PARTITION="cpu")
    run = run_snakemake(workdir, "--profile", str(ROOT / "profiles" / "slurm"), "--configfile", "config.yaml",
                        str(config_file), env=env, timeout=120)
    assert run.returncode != 0
    assert "GPU jobs on SLURM need the partition for GPU jobs" in run.stdout, run.stdout[-3000:]
    assert "MONTESSORI_SLURM_GPU_PARTITION" in run.stdout and "compute.slurm.gpu_partition" in run.stdout
    assert "has been submitted" not in run.stdout
    assert not (workdir / "results").exists()
