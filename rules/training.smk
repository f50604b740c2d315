# Preference pairs, teacher DPO and student SFT. Round k+1 starts from round k's models.


def pair_scores(wildcards) -> str:
    """What pairs.signal reads: the merged influence (influence, loss) or the probe judge's ratings."""
    if PAIRS_FROM_INFLUENCE:
        return f"{R}/round{wildcards.k}/influence/influence.jsonl"
    return f"{R}/round{wildcards.k}/probe_judge/scores.jsonl"


rule preference_pairs:
    input:
        scores=pair_scores,
        probing=f"{R}/round{{k}}/probes/probing.jsonl",
    output:
        pairs=f"{R}/round{{k}}/pairs.jsonl",
        summary=f"{R}/round{{k}}/pairs_summary.json",
    params:
        settings=settings(**config["pairs"]),
    log:
        f"{LOGS}/round{{k}}/preference_pairs.log",
    benchmark:
        f"{BENCH}/round{{k}}/preference_pairs.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("preference_pairs")
        + " --scores {input.scores} --responses {input.probing} --out {output.pairs}"
        + " --summary {output.summary} > {log} 2>&1"


rule dpo_teacher:
    """DPO of the teacher on its own helpful-vs-harmful outputs; reference = the teacher before."""
    input:
        teacher=lambda w: probe_teacher_card(w.k),
        pairs=f"{R}/round{{k}}/pairs.jsonl",
    output:
        done=f"{R}/round{{k}}/teacher.done",
        loss_json=f"{R}/round{{k}}/teacher_loss.json",
        loss_png=report(f"{R}/round{{k}}/teacher_loss.png", caption="../report/teacher_loss.rst", category="Training",
                        labels={"model": "teacher DPO", "round": "{k}"}),
    params:
        out_dir=f"{R}/round{{k}}/teacher",
        settings=settings(**config["dpo"], seed=config["seed"]),
    log:
        f"{LOGS}/round{{k}}/dpo_teacher.log",
    benchmark:
        f"{BENCH}/round{{k}}/dpo_teacher.tsv"
    threads: THREADS
    resources:
        mem_mb=memory_mb("dpo"),
        runtime=720,
        **gpu_job(DPO_GPUS),
    retries: 1
    conda:
        "../envs/training.yaml"
    shell:
        training_launcher("dpo_teacher", DPO_GPUS)
        + " --teacher {input.teacher} --pairs {input.pairs} --out-dir {params.out_dir} --done {output.done}"
        + " --loss-json {output.loss_json} --loss-png {output.loss_png} > {log} 2>&1"


rule sft_student:
    """SFT of the student on the method's synthesized training set; resumes from its checkpoints."""
    input:
        student=lambda w: student_card(w.method, w.k),
        data=f"{R}/round{{k}}/{{method}}/train/responses.jsonl",
    output:
        done=f"{R}/round{{k}}/{{method}}/student.done",
        loss_json=f"{R}/round{{k}}/{{method}}/student_loss.json",
        loss_png=report(f"{R}/round{{k}}/{{method}}/student_loss.png", caption="../report/student_loss.rst",
                        category="Training", labels={"model": "{method} student SFT", "round": "{k}"}),
    params:
        out_dir=f"{R}/round{{k}}/{{method}}/student",
        settings=settings(**config["sft"], seed=config["seed"], chat_template=config["models"]["chat_template"]),
    log:
        f"{LOGS}/round{{k}}/{{method}}/sft_student.log",
    benchmark:
        f"{BENCH}/round{{k}}/{{method}}/sft_student.tsv"
    threads: THREADS
    resources:
        mem_mb=memory_mb("sft"),
        runtime=1440,
        **gpu_job(TRAINING_GPUS),
    retries: 1
    conda:
        "../envs/training.yaml"
    shell:
        training_launcher("sft_student")
        + " --student {input.student} --data {input.data} --out-dir {params.out_dir} --done {output.done}"
        + " --loss-json {output.loss_json} --loss-png {output.loss_png} > {log} 2>&1"
