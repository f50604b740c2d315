# The Self-Reward baseline (Yuan et al., 2024; montessori/self_reward.py, docs/methods.md): round k
# is Self-Rewarding iteration k. The untrained teacher writes the instructions (the synthesis rules,
# SET = self_reward/train, as for self_instruct); the student as round k-1 left it answers each
# self_reward.n times; a judge scores the answers (self_reward.judge: external = evaluation.judge,
# self = the student); the best answer against the worst is a DPO pair; the student learns by DPO.
# Its student R/round<k>/self_reward/student.done is evaluated like every other method's.

SELF_REWARD = config["self_reward"]
SELF_JUDGE = SELF_REWARD["judge"] == "self"
SR = f"{R}/round{{k}}/self_reward"
SR_LOGS = f"{LOGS}/round{{k}}/self_reward"
SR_BENCH = f"{BENCH}/round{{k}}/self_reward"

localrules:
    self_reward_pairs,


# The student's DPO writes the same student.done as the SFT of the other methods.
ruleorder: dpo_self_reward_student > sft_student


def self_reward_judge_inputs(wildcards) -> dict:
    """The self judge is the student being trained; the external judge is the evaluation's."""
    if SELF_JUDGE:
        return {"judge": student_card("self_reward", wildcards.k)}
    return {"judge": judge_card(wildcards)}


def self_reward_dpo_memory_mb(wildcards, attempt):
    """As the teacher's DPO (montessori/memory.py), sized for the student's model."""
    try:
        student_as_teacher = {**config, "models": {**config["models"], "teacher": config["models"]["student"]}}
        return rule_memory_mb("dpo", student_as_teacher) * attempt
    except ConfigError as err:
        raise WorkflowError(str(err)) from None


rule self_reward_candidates:
    """The student's self_reward.n sampled answers to each of the round's instructions."""
    input:
        instructions=f"{SR}/train/instructions.jsonl",
        student=lambda w: student_card("self_reward", w.k),
    output:
        f"{SR}/candidates.jsonl",
    params:
        settings=lambda w: settings_json(n=SELF_REWARD["n"], sampling=SELF_REWARD["sampling"], seed=config["seed"],
                                         backend=config["backend"], chat_template=config["models"]["chat_template"],
                                         label=f"r{w.k}-self_reward"),
    log:
        f"{SR_LOGS}/candidates.log",
    benchmark:
        f"{SR_BENCH}/candidates.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=240,
        **gpu_job(GPUS),
    conda:
        "../envs/generation.yaml"
    shell:
        montessori("self_reward_candidates")
        + " --instructions {input.instructions} --student {input.student} --out {output} > {log} 2>&1"


rule self_reward_judge:
    """Each candidate's score: the student's expected additive points (self) or evaluation.judge's
    MT-Bench rating (external, the probe judge's stage); cached, so a rerun asks only what is missing."""
    input:
        unpack(self_reward_judge_inputs),
        candidates=f"{SR}/candidates.jsonl",
    output:
        f"{SR}/scores.jsonl",
    params:
        settings=settings(chat_template=config["models"]["chat_template"]) if SELF_JUDGE else settings(
            judge=config["evaluation"]["judge"],
            mt_bench={"judge_prompts": config["evaluation"]["mt_bench"]["judge_prompts"]}),
        cache=f"{SR}/judge_cache.jsonl",
        judge=judge_option,
    log:
        f"{SR_LOGS}/judge.log",
    benchmark:
        f"{SR_BENCH}/judge.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=120,
        **(gpu_job(GPUS) if SELF_JUDGE else judge_job()),
    conda:
        "../envs/generation.yaml"
    shell:
        (montessori("self_reward_judge") + " --candidates {input.candidates} --student {input.judge}"
         if SELF_JUDGE else montessori("judge_probes") + " --probing {input.candidates} {params.judge}")
        + " --out {output} --cache {params.cache} > {log} 2>&1"


rule self_reward_pairs:
    """Self-Rewarding's pairs: per instruction, the best-scored answer against the worst, when they differ."""
    input:
        scores=f"{SR}/scores.jsonl",
        candidates=f"{SR}/candidates.jsonl",
    output:
        pairs=f"{SR}/pairs.jsonl",
        summary=f"{SR}/pairs_summary.json",
    params:
        settings=settings(signal="judge", rule="rank", min_margin=0.0),
    log:
        f"{SR_LOGS}/pairs.log",
    benchmark:
        f"{SR_BENCH}/pairs.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("preference_pairs")
        + " --scores {input.scores} --responses {input.candidates} --out {output.pairs}"
        + " --summary {output.summary} > {log} 2>&1"


rule dpo_self_reward_student:
    """DPO of the student on its judged answers (the teacher's DPO stage); reference = the student before."""
    input:
        student=lambda w: student_card("self_reward", w.k),
        pairs=f"{SR}/pairs.jsonl",
    output:
        done=f"{SR}/student.done",
        loss_json=f"{SR}/student_loss.json",
        loss_png=report(f"{SR}/student_loss.png", category="Training",
                        labels={"model": "self_reward student DPO", "round": "{k}"}),
    params:
        out_dir=f"{SR}/student",
        settings=settings(**config["dpo"], seed=config["seed"], chat_template=config["models"]["chat_template"]),
    log:
        f"{SR_LOGS}/dpo_student.log",
    benchmark:
        f"{SR_BENCH}/dpo_student.tsv"
    threads: THREADS
    resources:
        mem_mb=self_reward_dpo_memory_mb,
        runtime=720,
        **gpu_job(DPO_GPUS),
    retries: 1
    conda:
        "../envs/training.yaml"
    shell:
        training_launcher("dpo_teacher", DPO_GPUS)
        + " --teacher {input.student} --pairs {input.pairs} --out-dir {params.out_dir} --done {output.done}"
        + " --loss-json {output.loss_json} --loss-png {output.loss_png} > {log} 2>&1"
