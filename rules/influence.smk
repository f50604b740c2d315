# Warm-up the student, score every probing pair's local data influence (one job per shard),
# and merge the shards.


rule reference_set:
    """The reference pairs whose loss defines influence (influence.reference.kind); refused if they
    overlap an evaluation set, unless allow_eval_contamination."""
    output:
        f"{R}/reference.jsonl",
    params:
        settings=settings(
            **config["influence"]["reference"],
            seed=config["seed"],
            eval_sources=[config["evaluation"]["alpaca_eval"]["source"], config["evaluation"]["mt_bench"]["questions"]],
        ),
    log:
        f"{LOGS}/reference_set.log",
    benchmark:
        f"{BENCH}/reference_set.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("reference_set") + " --out {output} > {log} 2>&1"


rule warmup:
    """Fine-tune the student on the warm-up set; save fp32 weights and the AdamW state."""
    input:
        student=lambda w: student_card("montessori", w.k),
        data=f"{R}/round{{k}}/probes/warmup.jsonl",
    output:
        # The sentinel is the output: Snakemake would wipe a directory() output before a rerun.
        done=kept(f"{R}/round{{k}}/warmup.done", "warmup"),
    params:
        out_dir=f"{R}/round{{k}}/warmup",
        settings=settings(**config["warmup"], seed=config["seed"], chat_template=config["models"]["chat_template"]),
    log:
        f"{LOGS}/round{{k}}/warmup.log",
    benchmark:
        f"{BENCH}/round{{k}}/warmup.tsv"
    threads: THREADS
    resources:
        mem_mb=memory_mb("warmup"),
        runtime=240,
        **gpu_job(TRAINING_GPUS),
    retries: 1
    conda:
        "../envs/training.yaml"
    shell:
        training_launcher("warmup")
        + " --student {input.student} --data {input.data} --out-dir {params.out_dir} --done {output.done}"
        + " > {log} 2>&1"


rule influence:
    """One shard of the probing set: one AdamW step per pair from the warm-up state."""
    input:
        warmup=f"{R}/round{{k}}/warmup.done",
        probing=f"{R}/round{{k}}/probes/probing.jsonl",
        reference=f"{R}/reference.jsonl",
    output:
        scores=f"{R}/round{{k}}/influence/shard-{{shard}}.jsonl",
        summary=f"{R}/round{{k}}/influence/shard-{{shard}}.summary.json",
    params:
        settings=settings(**section("influence", drop=("reference",)), seed=config["seed"]),
    log:
        f"{LOGS}/round{{k}}/influence.shard-{{shard}}.log",
    benchmark:
        f"{BENCH}/round{{k}}/influence.shard-{{shard}}.tsv"
    threads: THREADS
    resources:
        mem_mb=memory_mb("influence"),
        runtime=480,
        **gpu_job(GPUS * config["influence"]["gpus_per_shard"]),
    retries: 1
    conda:
        "../envs/training.yaml"
    shell:
        montessori("influence")
        + " --warmup {input.warmup} --probing {input.probing} --reference {input.reference}"
        + " --out {output.scores} --summary {output.summary} --shard {wildcards.shard} > {log} 2>&1"


rule merge_influence:
    """Every probing id scored exactly once; the influence table, its summary and a histogram."""
    input:
        probing=f"{R}/round{{k}}/probes/probing.jsonl",
        shards=lambda w: expand(f"{R}/round{w.k}/influence/shard-{{shard}}.jsonl", shard=INFLUENCE_SHARDS),
    output:
        scores=f"{R}/round{{k}}/influence/influence.jsonl",
        summary=f"{R}/round{{k}}/influence/summary.json",
        histogram=report(f"{R}/round{{k}}/influence/histogram.png", caption="../report/influence_histogram.rst",
                         category="Influence", labels={"round": "{k}"}),
    params:
        settings=settings(),
    log:
        f"{LOGS}/round{{k}}/merge_influence.log",
    benchmark:
        f"{BENCH}/round{{k}}/merge_influence.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("merge_influence")
        + " --shard-paths {input.shards} --probing {input.probing} --out {output.scores}"
        + " --summary {output.summary} --histogram {output.histogram} > {log} 2>&1"


rule remove_warmup:
    """storage.keep.warmup false: the round's warm-up checkpoint goes once its influence is merged
    (every shard has read it). warmup.done is then a removed temp() file: `snakemake -n` has
    nothing to do, and an influence rerun trains the warm-up again."""
    input:
        f"{R}/round{{k}}/influence/influence.jsonl",
    output:
        f"{R}/round{{k}}/warmup.removed",
    params:
        out_dir=f"{R}/round{{k}}/warmup",
    log:
        f"{LOGS}/round{{k}}/remove_warmup.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "(du -sh {params.out_dir} || true; rm -rf {params.out_dir}; echo removed {params.out_dir}) > {log} 2>&1"
        " && touch {output}"
