import json

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from montessori.config import validate_config
from montessori.errors import ConfigError

try:
    validate_config(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None
validate(config, "../schemas/config.schema.yaml", set_default=True)

R = f"results/{config['run']}"
LOGS = f"logs/{config['run']}"
BENCH = f"benchmarks/{config['run']}"
ROUNDS = list(range(1, config["rounds"] + 1))
METHODS = config["methods"]
SYNTH_SHARDS = list(range(config["synthesis"]["shards"]))
INFLUENCE_SHARDS = list(range(config["influence"]["shards"]))
GPUS = config["compute"]["gpus"]
TRAINING_GPUS = config["compute"]["training_gpus"]
DPO_GPUS = config["dpo"]["gpus"] or TRAINING_GPUS
THREADS = config["compute"]["threads"]
REPORT = f"{R}/report.md"

SET_PATTERN = "probes|(montessori|self_instruct|self_instruct_api)/train"


wildcard_constraints:
    k=r"\d+",
    shard=r"\d+",
    set=SET_PATTERN,
    method="|".join(METHODS),
    role="teacher|student|judge",


def settings_json(**values) -> str:
    """The JSON a stage receives as --settings (quoted in the shell with :q)."""
    return json.dumps(values, sort_keys=True)


def settings(**values):
    """settings_json as a params function: Snakemake reads braces in a plain string param as
    wildcards, and config values hold braces (the chat templates of the presets, prompts)."""
    text = settings_json(**values)
    return lambda wildcards: text


# torch would otherwise start a thread per core of the node: on a shared cluster node, or with
# several jobs on a laptop, oversubscribed OpenMP threads spin against each other.
THREAD_LIMITS = "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"


def montessori(stage: str) -> str:
    """Shell prefix that runs one stage of the package with the `python` on PATH: the rule's conda
    environment under --sdm conda, else the environment Snakemake was started from."""
    return f"{THREAD_LIMITS} python -m montessori {stage} --settings {{params.settings:q}}"


def training_launcher(stage: str, gpus: int = TRAINING_GPUS) -> str:
    """One process on a CPU or one GPU; accelerate with FSDP over several GPUs."""
    if gpus > 1:
        return (f"{THREAD_LIMITS} accelerate launch --config_file {config['compute']['accelerate_config']} "
                f"--num_processes {gpus} -m montessori {stage} --settings {{params.settings:q}}")
    return montessori(stage)


# ---- models: which card each round reads -------------------------------------------------
def base_card(role: str) -> str:
    return f"{R}/models/{role}.json"


def probe_teacher_card(k) -> str:
    """Round k probes with the teacher as round k-1 left it."""
    return base_card("teacher") if int(k) == 1 else f"{R}/round{int(k) - 1}/teacher.done"


def student_card(method: str, k) -> str:
    """The student a round starts from: the untrained one, or the same method's previous student."""
    return base_card("student") if int(k) == 1 else f"{R}/round{int(k) - 1}/{method}/student.done"


def synthesis_teacher_card(wildcards) -> str:
    if wildcards.set == "probes":
        return probe_teacher_card(wildcards.k)
    method = wildcards.set.split("/")[0]
    if method == "montessori":
        return f"{R}/round{wildcards.k}/teacher.done"
    return base_card("teacher")


def synthesis_target(set_name: str) -> int:
    """Kept instructions wanted. The split takes whole prompt groups, so each of its two sets may
    overshoot by up to n - 1 records: the probes carry that slack."""
    if set_name == "probes":
        slack = 2 * (config["synthesis"]["n"] - 1)
        return config["probes"]["warmup_size"] + config["probes"]["probing_size"] + slack
    return config["train_set"]["size"]


def synthesis_settings(wildcards) -> str:
    method = wildcards.set.split("/")[0]
    return settings_json(
        **config["synthesis"],
        backend=config["backend"],
        seed=config["seed"],
        label=f"r{wildcards.k}-{wildcards.set.replace('/', '-')}",
        target=synthesis_target(wildcards.set),
        external_teacher=config["external_teacher"] if method == "self_instruct_api" else None,
    )


# ---- evaluation: every student, including the untrained one --------------------------------
def evaluated_students() -> list[str]:
    return ["base"] + [f"{method}-round{k}" for k in ROUNDS for method in METHODS]


def evaluated_student_card(name: str) -> str:
    if name == "base":
        return base_card("student")
    method, k = name.rsplit("-round", 1)
    return f"{R}/round{k}/{method}/student.done"
