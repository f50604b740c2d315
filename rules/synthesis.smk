# Seed pool, teacher instruction and response synthesis (sharded), and the warm-up/probing split.
# The same rules make the probing set (SET = probes) and each method's training set
# (SET = <method>/train); the teacher differs by SET (see synthesis_teacher_card).


rule seed_pool:
    """The seed instructions, without any reference-set instruction."""
    input:
        reference=f"{R}/reference.jsonl",
    output:
        f"{R}/seed_pool.jsonl",
    params:
        settings=settings(**config["seed_pool"], seed=config["seed"]),
    log:
        f"{LOGS}/seed_pool.log",
    benchmark:
        f"{BENCH}/seed_pool.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("seed_pool") + " --reference {input.reference} --out {output} > {log} 2>&1"


rule synth_instructions:
    """One shard of teacher-written instructions: n candidates per prompt, filtered, kept or not."""
    input:
        seed_pool=f"{R}/seed_pool.jsonl",
        teacher=instruction_teacher_card,
    output:
        kept(f"{R}/round{{k}}/{{set}}/instructions.shard-{{shard}}.jsonl", "synthesis_shards"),
    params:
        settings=lambda w: synthesis_settings(w, "synth_instructions"),
    log:
        f"{LOGS}/round{{k}}/{{set}}/synth_instructions.shard-{{shard}}.log",
    benchmark:
        f"{BENCH}/round{{k}}/{{set}}/synth_instructions.shard-{{shard}}.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=240,
        **gpu_job(GPUS),
    conda:
        "../envs/generation.yaml"
    shell:
        montessori("synth_instructions")
        + " --seed-pool {input.seed_pool} --teacher {input.teacher} --out {output} --shard {wildcards.shard}"
        + " > {log} 2>&1"


rule merge_instructions:
    """Cross-shard near-duplicate removal; stops with a clear message when the merge ends short."""
    input:
        lambda w: expand(f"{R}/round{w.k}/{w.set}/instructions.shard-{{shard}}.jsonl", shard=SYNTH_SHARDS),
    output:
        instructions=f"{R}/round{{k}}/{{set}}/instructions.jsonl",
        summary=f"{R}/round{{k}}/{{set}}/instructions_summary.json",
    params:
        settings=lambda w: settings_json(
            target=synthesis_target(w.set),
            rouge_threshold=config["synthesis"]["filters"]["rouge_threshold"],
            label=f"r{w.k}-{w.set.replace('/', '-')}",
        ),
    log:
        f"{LOGS}/round{{k}}/{{set}}/merge_instructions.log",
    benchmark:
        f"{BENCH}/round{{k}}/{{set}}/merge_instructions.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("merge_instructions")
        + " --shard-paths {input} --out {output.instructions} --summary {output.summary} > {log} 2>&1"


rule synth_responses:
    """One shard of the teacher's answers to the merged instructions."""
    input:
        instructions=f"{R}/round{{k}}/{{set}}/instructions.jsonl",
        teacher=synthesis_teacher_card,
    output:
        kept(f"{R}/round{{k}}/{{set}}/responses.shard-{{shard}}.jsonl", "synthesis_shards"),
    params:
        settings=lambda w: synthesis_settings(w, "synth_responses"),
    log:
        f"{LOGS}/round{{k}}/{{set}}/synth_responses.shard-{{shard}}.log",
    benchmark:
        f"{BENCH}/round{{k}}/{{set}}/synth_responses.shard-{{shard}}.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=240,
        **gpu_job(GPUS),
    conda:
        "../envs/generation.yaml"
    shell:
        montessori("synth_responses")
        + " --instructions {input.instructions} --teacher {input.teacher} --out {output} --shard {wildcards.shard}"
        + " > {log} 2>&1"


rule merge_responses:
    input:
        instructions=f"{R}/round{{k}}/{{set}}/instructions.jsonl",
        shards=lambda w: expand(f"{R}/round{w.k}/{w.set}/responses.shard-{{shard}}.jsonl", shard=SYNTH_SHARDS),
    output:
        f"{R}/round{{k}}/{{set}}/responses.jsonl",
    params:
        settings=lambda w: settings_json(**responses_setting(w.set, "merge_responses")),
    log:
        f"{LOGS}/round{{k}}/{{set}}/merge_responses.log",
    benchmark:
        f"{BENCH}/round{{k}}/{{set}}/merge_responses.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("merge_responses")
        + " --shard-paths {input.shards} --instructions {input.instructions} --out {output} > {log} 2>&1"


rule split_probes:
    """Warm-up and probing sets, split by prompt group (siblings never straddle the split)."""
    input:
        f"{R}/round{{k}}/probes/responses.jsonl",
    output:
        warmup=f"{R}/round{{k}}/probes/warmup.jsonl",
        probing=f"{R}/round{{k}}/probes/probing.jsonl",
    params:
        settings=lambda w: settings_json(**config["probes"], seed=config["seed"]),
    log:
        f"{LOGS}/round{{k}}/split_probes.log",
    benchmark:
        f"{BENCH}/round{{k}}/split_probes.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("split_probes")
        + " --responses {input} --warmup-out {output.warmup} --probing-out {output.probing} > {log} 2>&1"
