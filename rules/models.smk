rule prepare_model:
    """Convert the embedded GGUF model once, or pass a hub name / local directory through."""
    output:
        card=f"{R}/models/{{role}}.json",
    params:
        settings=lambda w: settings_json(
            spec=config["evaluation"]["judge"]["model"] if w.role == "judge" else config["models"][w.role],
            config_key="evaluation.judge.model" if w.role == "judge" else f"models.{w.role}",
        ),
    log:
        f"{LOGS}/models/{{role}}.log",
    benchmark:
        f"{BENCH}/models/{{role}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("prepare_model") + " --out {output.card} --models-dir resources/models > {log} 2>&1"
