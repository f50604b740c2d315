import json
import math

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from montessori import cluster
from montessori.config import validate_config
from montessori.errors import ConfigError
from montessori.evaluation.judges import judge_loads_a_model
from montessori.runtime import result_section, runtime_settings
from montessori.memory import rule_memory_mb

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
try:
    SITE = cluster.site_settings(config["compute"]["slurm"])
except ConfigError as err:
    raise WorkflowError(str(err)) from None

# self_reward/train: only instructions (the student answers them itself, rules/self_reward.smk);
# llm2llm/seeds, llm2llm/augment: only answered by the synthesis rules (rules/llm2llm.smk)
SET_PATTERN = "probes|(montessori|self_instruct|self_instruct_api|self_reward)/train|llm2llm/(seeds|augment)"


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


# ---- runtime (throughput) settings: outside the params, so a change reruns nothing -------------
# A shell command reaches this through Snakemake's formatting namespace (the workflow's globals):
# the rule's command text stays `--runtime {RUNTIME[stage]:q}` whatever the values, and Snakemake's
# `code` trigger compares that text, its `params` trigger only params. See montessori/runtime.py.
RUNTIME = {stage: json.dumps(values, sort_keys=True) for stage, values in runtime_settings(config).items()}


def section(dotted: str, drop: tuple[str, ...] = ()) -> dict:
    """A config section as a stage's settings: its throughput keys (and `drop`) left out."""
    return result_section(config, dotted, drop)


# ---- storage: an artifact kind not kept is a temp() output, removed once its readers finished ----
KEEP = config["storage"]["keep"]


def kept(path: str, kind: str):
    return path if KEEP[kind] else temp(path)


# pairs.signal judge rates the probes instead: no warm-up, no influence (rules/methods.smk).
PAIRS_FROM_INFLUENCE = config["pairs"]["signal"] != "judge"


def storage_cleanup() -> list[str]:
    """Sentinels of the cleanup jobs `all` asks for: the warm-up checkpoint directory is not a
    declared output (Snakemake would wipe it before a rerun, losing the checkpoints a resume needs),
    so a job removes it once the round's influence is merged. Only the montessori method warms up."""
    if KEEP["warmup"] or not PAIRS_FROM_INFLUENCE or "montessori" not in METHODS:
        return []
    return [f"{R}/round{k}/warmup.removed" for k in ROUNDS]


# Jobs of seconds: run by Snakemake itself, never waiting in a cluster queue.
localrules:
    seed_pool,
    reference_set,
    merge_instructions,
    merge_responses,
    split_probes,
    merge_influence,
    preference_pairs,
    remove_warmup,
    analysis_figures,
    report,


# torch would otherwise start a thread per core of the node: on a shared cluster node, or with
# several jobs on a laptop, oversubscribed OpenMP threads spin against each other.
THREAD_LIMITS = "OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"


def stage_arguments(stage: str) -> str:
    runtime = f" --runtime {{RUNTIME[{stage}]:q}}" if stage in RUNTIME else ""
    return f"-m montessori {stage} --settings {{params.settings:q}}{runtime}"


def montessori(stage: str) -> str:
    """Shell prefix that runs one stage of the package with the `python` on PATH: the rule's conda
    environment under --sdm conda, else the environment Snakemake was started from."""
    return f"{THREAD_LIMITS} python {stage_arguments(stage)}"


def training_launcher(stage: str, gpus: int = TRAINING_GPUS) -> str:
    """One process on a CPU or one GPU; accelerate with FSDP over several GPUs."""
    if gpus > 1:
        return (f"{THREAD_LIMITS} accelerate launch --config_file {config['compute']['accelerate_config']} "
                f"--num_processes {gpus} {stage_arguments(stage)}")
    return montessori(stage)


# ---- what each job asks SLURM for (montessori/cluster.py says why the rules, not a profile) --
def executor_name() -> str | None:
    """The executor Snakemake runs jobs with; known once it builds the jobs, not at parse time."""
    plugin = workflow.executor_plugin
    return None if plugin is None else plugin.name


def gpu_job(gpus: int) -> dict:
    """Resources of a job on `gpus` GPUs: gpu, gpu_model, cpus_per_gpu, one node, the GPU
    partition; a CPU job when gpus is 0."""
    return cluster.gpu_job(SITE, gpus, executor_name)


def cpu_job() -> dict:
    return cluster.cpu_job(SITE)


onstart:
    # Snakemake evaluates a job's resources only when it submits that job: without this, the CPU
    # jobs ahead of the first GPU job would be queued before a missing GPU partition is noticed.
    for job in workflow.dag.needrun_jobs():
        job.resources


def judge_job() -> dict:
    """A local judge is a model on GPUs; an API judge only waits on HTTP, on the CPU partition."""
    return gpu_job(GPUS) if judge_loads_a_model(config["evaluation"]["judge"]) else cpu_job()


def memory_mb(kind: str):
    """mem_mb from the model's size (montessori/memory.py), doubled on the retry after a failure;
    computed when Snakemake builds the jobs, so that commands that build none (--unlock) never
    need the model's shape."""
    def mem_mb(wildcards, attempt):
        try:
            return rule_memory_mb(kind, config) * attempt
        except ConfigError as err:
            raise WorkflowError(str(err)) from None

    return mem_mb


# ---- models: which card each round reads -------------------------------------------------
def base_card(role: str) -> str:
    return f"{R}/models/{role}.json"


def probe_teacher_card(k) -> str:
    """Round k probes with the teacher as round k-1 left it."""
    return base_card("teacher") if int(k) == 1 else f"{R}/round{int(k) - 1}/teacher.done"


def student_card(method: str, k) -> str:
    """The student a round starts from: the untrained one, or the same method's previous student.
    LLM2LLM fine-tunes the untrained student afresh on each iteration's whole set (docs/methods.md)."""
    if int(k) == 1 or method == "llm2llm":
        return base_card("student")
    return f"{R}/round{int(k) - 1}/{method}/student.done"


# teacher_optimization (docs/methods.md; its rules are in rules/teacheropt.smk).
TEACHER_OPTIMIZATION = config["teacher_optimization"]


def responses_per_instruction(set_name: str) -> int:
    """dpo_responses: synthesis.n responses to each probing instruction, to pair; one otherwise."""
    return config["synthesis"]["n"] if TEACHER_OPTIMIZATION == "dpo_responses" and set_name == "probes" else 1


def instruction_teacher_card(wildcards) -> str:
    """dpo_responses optimizes only how the teacher answers: every instruction is the untrained
    teacher's, so the montessori set differs from self_instruct's by its responses alone."""
    if TEACHER_OPTIMIZATION == "dpo_responses":
        return base_card("teacher")
    return synthesis_teacher_card(wildcards)


def synthesis_teacher_card(wildcards) -> str:
    if wildcards.set == "probes":
        return probe_teacher_card(wildcards.k)
    method = wildcards.set.split("/")[0]
    if method == "montessori":
        return f"{R}/round{wildcards.k}/teacher.done"
    return base_card("teacher")


def synthesis_target(set_name: str) -> int:
    """Kept instructions wanted. The split takes whole prompt groups, so each of its two sets may
    overshoot by up to n - 1 records: the probes carry that slack. With several responses per
    probing instruction (dpo_responses) the groups are an instruction's responses instead."""
    per_instruction = responses_per_instruction(set_name)
    if per_instruction > 1:
        # Each instruction gives a whole group of per_instruction records: enough groups for each set.
        return (math.ceil(config["probes"]["warmup_size"] / per_instruction)
                + math.ceil(config["probes"]["probing_size"] / per_instruction))
    if set_name == "probes":
        slack = 2 * (config["synthesis"]["n"] - 1)
        return config["probes"]["warmup_size"] + config["probes"]["probing_size"] + slack
    return config["train_set"]["size"]


# What only one of the two synthesis stages reads.
INSTRUCTION_KEYS = ("n", "prompt_examples", "generated_examples", "generated_pool_refresh", "oversample",
                    "prompt_style",
                    "max_prompts_factor", "instruction_sampling", "filters")


def responses_setting(set_name: str, stage: str) -> dict:
    """responses_per_instruction for the response stages, only where it is not 1: the main run's
    settings (and so its jobs' params) stay as they were before the key existed."""
    per_instruction = responses_per_instruction(set_name)
    if stage == "synth_instructions" or per_instruction == 1:
        return {}
    return {"responses_per_instruction": per_instruction}


def synthesis_settings(wildcards, stage: str) -> str:
    method = wildcards.set.split("/")[0]
    instructions = stage == "synth_instructions"
    drop = ("response_sampling",) if instructions else INSTRUCTION_KEYS
    return settings_json(
        **section("synthesis", drop=drop),
        backend=config["backend"],
        seed=config["seed"],
        label=f"r{wildcards.k}-{wildcards.set.replace('/', '-')}",
        **({"target": synthesis_target(wildcards.set)} if instructions else {}),
        **responses_setting(wildcards.set, stage),
        external_teacher=config["external_teacher"] if method == "self_instruct_api" else None,
    )


# ---- evaluation: every student, including the untrained one --------------------------------
# Transfer students (config transfer_students, rules/methods.smk): transfer-<name>-<method>.
TRANSFER = {student["name"]: student for student in config["transfer_students"]}


# Self-Reward trains by DPO on its own judged answers: no training set for a transfer student.
TRANSFER_METHODS = [method for method in METHODS if method != "self_reward"]


def evaluated_students() -> list[str]:
    return (["base"] + [f"{method}-round{k}" for k in ROUNDS for method in METHODS]
            + [f"transfer-{name}-{method}" for name in TRANSFER for method in TRANSFER_METHODS])


def transfer_student(name: str) -> tuple[str, str] | None:
    """(transfer student, method) of a student name transfer-<name>-<method>, else None."""
    if not name.startswith("transfer-"):
        return None
    student, method = name[len("transfer-"):].rsplit("-", 1)
    return student, method


def evaluated_student_card(name: str) -> str:
    if name == "base":
        return base_card("student")
    if transfer_student(name):
        student, method = transfer_student(name)
        return f"{R}/transfer/{student}/{method}/student.done"
    method, k = name.rsplit("-round", 1)
    return f"{R}/round{k}/{method}/student.done"


def student_chat_template(name: str) -> str | None:
    """The chat template a student is prompted with: a transfer student's own setting."""
    if transfer_student(name):
        return TRANSFER[transfer_student(name)[0]]["chat_template"]
    return config["models"]["chat_template"]
