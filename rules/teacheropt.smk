# The teacher-optimization ablation (config teacher_optimization, docs/methods.md).
# dpo_instructions (the default) and dpo_responses use rules/training.smk's dpo_teacher as it is
# (dpo_responses changes only what the probes hold: rules/common.smk responses_per_instruction).
# bootstrap replaces dpo_teacher by the two rules below; they write the same teacher card.

if TEACHER_OPTIMIZATION == "bootstrap":

    ruleorder: bootstrap_teacher > dpo_teacher

    localrules:
        bootstrap_set,

    rule bootstrap_set:
        """The round's helpful candidates: the chosen side of its preference pairs, each once."""
        input:
            pairs=f"{R}/round{{k}}/pairs.jsonl",
        output:
            records=f"{R}/round{{k}}/bootstrap/set.jsonl",
            summary=f"{R}/round{{k}}/bootstrap/set_summary.json",
        params:
            settings=settings(),
        log:
            f"{LOGS}/round{{k}}/bootstrap_set.log",
        benchmark:
            f"{BENCH}/round{{k}}/bootstrap_set.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
            **cpu_job(),
        conda:
            "../envs/base.yaml"
        shell:
            montessori("bootstrap_set") + " --pairs {input.pairs} --out {output.records}"
            + " --summary {output.summary} > {log} 2>&1"

    rule bootstrap_teacher:
        """SFT of the teacher on its helpful candidates (generation prompt -> its raw output), with
        the dpo section's optimizer settings; the same card as dpo_teacher."""
        input:
            teacher=lambda w: probe_teacher_card(w.k),
            data=f"{R}/round{{k}}/bootstrap/set.jsonl",
        output:
            done=f"{R}/round{{k}}/teacher.done",
            loss_json=f"{R}/round{{k}}/teacher_loss.json",
            loss_png=report(f"{R}/round{{k}}/teacher_loss.png", category="Training",
                            labels={"model": "teacher bootstrap SFT", "round": "{k}"}),
        params:
            out_dir=f"{R}/round{{k}}/teacher",
            # beta is DPO's alone; every other dpo key means the same for this SFT.
            settings=settings(**{key: value for key, value in config["dpo"].items() if key != "beta"},
                              seed=config["seed"]),
        log:
            f"{LOGS}/round{{k}}/bootstrap_teacher.log",
        benchmark:
            f"{BENCH}/round{{k}}/bootstrap_teacher.tsv"
        threads: THREADS
        resources:
            # The DPO job's request (policy and reference teacher): an upper bound for one teacher's SFT.
            mem_mb=memory_mb("dpo"),
            runtime=720,
            **gpu_job(DPO_GPUS),
        retries: 1
        conda:
            "../envs/training.yaml"
        shell:
            training_launcher("bootstrap_teacher", DPO_GPUS)
            + " --teacher {input.teacher} --data {input.data} --out-dir {params.out_dir} --done {output.done}"
            + " --loss-json {output.loss_json} --loss-png {output.loss_png} > {log} 2>&1"
