# Method switches beyond the paper's main run (docs/methods.md): the probe judge of the utility
# signal ablation (pairs.signal: judge), and the cross-student transfer (transfer_students).

import re


rule judge_probes:
    """pairs.signal judge: evaluation.judge's 1-10 rating of every probing pair, in place of influence."""
    input:
        probing=f"{R}/round{{k}}/probes/probing.jsonl",
        judge=judge_card,
    output:
        f"{R}/round{{k}}/probe_judge/scores.jsonl",
    params:
        settings=settings(judge=config["evaluation"]["judge"],
                          mt_bench={"judge_prompts": config["evaluation"]["mt_bench"]["judge_prompts"]}),
        cache=f"{R}/round{{k}}/probe_judge/judge_cache.jsonl",
        judge=judge_option,
    log:
        f"{LOGS}/round{{k}}/judge_probes.log",
    benchmark:
        f"{BENCH}/round{{k}}/judge_probes.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=120,
        **judge_job(),
    conda:
        "../envs/generation.yaml"
    shell:
        montessori("judge_probes")
        + " --probing {input.probing} --out {output} --cache {params.cache} {params.judge} > {log} 2>&1"


# ---- cross-student transfer: the last round's training sets, other students ---------------------
# TRANSFER (name -> entry) and the student names transfer-<name>-<method> are in rules/common.smk.
TRANSFER_KEY = {name: f"transfer_students[{index}]" for index, name in enumerate(TRANSFER)}


def transfer_sft_settings(wildcards) -> str:
    student = TRANSFER[wildcards.name]
    return settings_json(**{**config["sft"], "lr": student["lr"] or config["sft"]["lr"]}, seed=config["seed"],
                         chat_template=student["chat_template"])


def transfer_memory_mb(wildcards, attempt):
    """As the main student's SFT (montessori/memory.py), sized for this student's model."""
    try:
        return rule_memory_mb("sft", config, TRANSFER[wildcards.name]["model"],
                              f"{TRANSFER_KEY[wildcards.name]}.model") * attempt
    except ConfigError as err:
        raise WorkflowError(str(err)) from None


rule prepare_transfer_model:
    """A transfer student's model card (the embedded model converted once, or a hub name passed through)."""
    output:
        card=f"{R}/models/transfer-{{name}}.json",
    wildcard_constraints:
        name="|".join(map(re.escape, TRANSFER)) or "(?!)",
    params:
        settings=lambda w: settings_json(spec=TRANSFER[w.name]["model"], config_key=f"{TRANSFER_KEY[w.name]}.model"),
    log:
        f"{LOGS}/models/transfer-{{name}}.log",
    benchmark:
        f"{BENCH}/models/transfer-{{name}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("prepare_model") + " --out {output.card} --models-dir resources/models > {log} 2>&1"


rule sft_transfer_student:
    """SFT of a transfer student, from its base weights, on one method's training set of the last round."""
    input:
        student=f"{R}/models/transfer-{{name}}.json",
        data=f"{R}/round{ROUNDS[-1]}/{{method}}/train/responses.jsonl",
    output:
        done=f"{R}/transfer/{{name}}/{{method}}/student.done",
        loss_json=f"{R}/transfer/{{name}}/{{method}}/student_loss.json",
        loss_png=report(f"{R}/transfer/{{name}}/{{method}}/student_loss.png", category="Training",
                        labels={"model": "transfer {name}: {method} student SFT", "round": "transfer"}),
    wildcard_constraints:
        name="|".join(map(re.escape, TRANSFER)) or "(?!)",
    params:
        out_dir=f"{R}/transfer/{{name}}/{{method}}/student",
        settings=transfer_sft_settings,
    log:
        f"{LOGS}/transfer/{{name}}/{{method}}/sft_student.log",
    benchmark:
        f"{BENCH}/transfer/{{name}}/{{method}}/sft_student.tsv"
    threads: THREADS
    resources:
        mem_mb=transfer_memory_mb,
        runtime=1440,
        **gpu_job(TRAINING_GPUS),
    retries: 1
    conda:
        "../envs/training.yaml"
    shell:
        training_launcher("sft_student")
        + " --student {input.student} --data {input.data} --out-dir {params.out_dir} --done {output.done}"
        + " --loss-json {output.loss_json} --loss-png {output.loss_png} > {log} 2>&1"
