# Every student (the untrained one, and each method's student of each round) is evaluated the
# same way: AlpacaEval-style pairwise judging, MT-Bench single-answer grading, lm-eval-harness, and
# (judge-free) the NLL of held-out strong answers.
# <student> = base | <method>-round<k> | transfer-<name>-<method> (config transfer_students).

EVAL = f"{R}/eval/{{student}}"
JUDGE_LOADS_A_MODEL = judge_loads_a_model(config["evaluation"]["judge"])


def eval_settings(judging: bool = False, **sections):
    """Settings of an evaluation stage; a judge keeps its own chat template, never the student's.
    Generation batch and vLLM memory share come through --runtime (RUNTIME in common.smk)."""
    return lambda wildcards: settings_json(
        seed=config["seed"],
        backend=config["backend"],
        chat_template=None if judging else student_chat_template(wildcards.student),
        **sections,
    )


def alpaca_section(*keys) -> dict:
    return {key: config["evaluation"]["alpaca_eval"][key] for key in keys}


def alpaca_references() -> dict[str, str]:
    """{label: reference}: `dataset`, or the method of `method:<name>`; one judged comparison each."""
    references = config["evaluation"]["alpaca_eval"]["reference"]
    return {r.split(":", 1)[-1]: r for r in ([references] if isinstance(references, str) else references)}


def alpaca_reference(wildcards) -> str:
    """The dataset's reference outputs, or another method's student outputs (the paper's setting)."""
    reference = alpaca_references()[wildcards.reference]
    if reference == "dataset":
        return []
    method = reference.split(":", 1)[1]
    if transfer_student(wildcards.student):
        # a transfer student against itself trained on the other method's data
        return f"{R}/eval/transfer-{transfer_student(wildcards.student)[0]}-{method}/alpaca_eval/outputs.json"
    round_k = wildcards.student.rsplit("-round", 1)[1] if "-round" in wildcards.student else "1"
    return f"{R}/eval/{method}-round{round_k}/alpaca_eval/outputs.json"


def judge_card(wildcards) -> list[str]:
    return [base_card("judge")] if JUDGE_LOADS_A_MODEL else []


def judge_option(wildcards, input) -> str:
    return f"--judge {input.judge}" if input.get("judge") else ""


def reference_option(wildcards, input) -> str:
    return str(input.reference) if input.get("reference") else config["evaluation"]["alpaca_eval"]["source"]


def excluded_reference(wildcards) -> list[str]:
    """The influence reference set, when it may hold evaluation instructions: those are not evaluated."""
    return [f"{R}/reference.jsonl"] if config["influence"]["reference"]["allow_eval_contamination"] else []


def exclude_option(wildcards, input) -> str:
    return f"--exclude {input.exclude}" if input.get("exclude") else ""


rule eval_alpaca_generate:
    input:
        student=lambda w: evaluated_student_card(w.student),
        exclude=excluded_reference,
    output:
        outputs=f"{EVAL}/alpaca_eval/outputs.json",
        selection=f"{EVAL}/alpaca_eval/selection.json",
    params:
        settings=eval_settings(alpaca_eval=alpaca_section("source", "limit", "max_new_tokens", "temperature")),
        exclude=exclude_option,
    log:
        f"{LOGS}/eval/{{student}}/alpaca_generate.log",
    benchmark:
        f"{BENCH}/eval/{{student}}/alpaca_generate.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=120,
        **gpu_job(GPUS),
    conda:
        "../envs/generation.yaml"
    shell:
        montessori("eval_alpaca_generate") + " --student {input.student} --out {output.outputs}"
        + " --selection {output.selection} {params.exclude} --name {wildcards.student} > {log} 2>&1"


rule eval_alpaca_judge:
    """Pairwise preference against one reference's outputs; judgements cached across reruns."""
    input:
        outputs=f"{EVAL}/alpaca_eval/outputs.json",
        reference=alpaca_reference,
        judge=judge_card,
    output:
        annotations=f"{EVAL}/alpaca_eval/vs-{{reference}}/annotations.json",
        metrics=f"{EVAL}/alpaca_eval/vs-{{reference}}/metrics.json",
    wildcard_constraints:
        reference="|".join(alpaca_references()),
    params:
        settings=eval_settings(judging=True, judge=config["evaluation"]["judge"], alpaca_eval=alpaca_section(
            "source", "instruction_difficulty", "gamed_annotations", "position_bias_sample")),
        cache=f"{EVAL}/alpaca_eval/vs-{{reference}}/judge_cache.jsonl",
        reference=reference_option,
        judge=judge_option,
    log:
        f"{LOGS}/eval/{{student}}/alpaca_judge_vs-{{reference}}.log",
    benchmark:
        f"{BENCH}/eval/{{student}}/alpaca_judge_vs-{{reference}}.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=120,
        **judge_job(),
    conda:
        "../envs/generation.yaml"
    shell:
        montessori("eval_alpaca_judge")
        + " --outputs {input.outputs} --reference {params.reference} --annotations {output.annotations}"
        + " --metrics {output.metrics} --cache {params.cache} --reference-name {wildcards.reference:q}"
        + " {params.judge} > {log} 2>&1"


rule eval_mt_bench_generate:
    input:
        student=lambda w: evaluated_student_card(w.student),
    output:
        f"{EVAL}/mt_bench/answers.jsonl",
    params:
        settings=eval_settings(mt_bench=section("evaluation.mt_bench", drop=("reference_answers", "judge_prompts"))),
    log:
        f"{LOGS}/eval/{{student}}/mt_bench_generate.log",
    benchmark:
        f"{BENCH}/eval/{{student}}/mt_bench_generate.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=120,
        **gpu_job(GPUS),
    conda:
        "../envs/generation.yaml"
    shell:
        montessori("eval_mt_bench_generate") + " --student {input.student} --out {output} --name {wildcards.student}"
        + " > {log} 2>&1"


rule eval_mt_bench_judge:
    """Single-answer grading 1-10 with the MT-Bench judge prompts (references for math/reasoning/coding)."""
    input:
        answers=f"{EVAL}/mt_bench/answers.jsonl",
        judge=judge_card,
    output:
        judgments=f"{EVAL}/mt_bench/judgment.jsonl",
        scores=f"{EVAL}/mt_bench/scores.json",
    params:
        settings=eval_settings(judging=True, judge=config["evaluation"]["judge"],
                               mt_bench=section("evaluation.mt_bench", drop=("limit", "max_new_tokens"))),
        cache=f"{EVAL}/mt_bench/judge_cache.jsonl",
        judge=judge_option,
    log:
        f"{LOGS}/eval/{{student}}/mt_bench_judge.log",
    benchmark:
        f"{BENCH}/eval/{{student}}/mt_bench_judge.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=120,
        **judge_job(),
    conda:
        "../envs/generation.yaml"
    shell:
        montessori("eval_mt_bench_judge")
        + " --answers {input.answers} --out {output.judgments} --scores {output.scores} --cache {params.cache}"
        + " {params.judge} > {log} 2>&1"


rule eval_lm_eval:
    input:
        student=lambda w: evaluated_student_card(w.student),
    output:
        f"{EVAL}/lm_eval/results.json",
    params:
        settings=eval_settings(lm_eval=section("evaluation.lm_eval")),
    log:
        f"{LOGS}/eval/{{student}}/lm_eval.log",
    benchmark:
        f"{BENCH}/eval/{{student}}/lm_eval.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=240,
        **gpu_job(GPUS),
    conda:
        "../envs/evaluation.yaml"
    shell:
        montessori("eval_lm_eval") + " --student {input.student} --out {output} --name {wildcards.student}"
        + " > {log} 2>&1"


rule eval_nll:
    """Judge-free: the student's NLL of held-out strong answers; items in the seed pool or the
    reference set are dropped (and counted), so it never scores what the pipeline trains on."""
    input:
        student=lambda w: evaluated_student_card(w.student),
        seed_pool=f"{R}/seed_pool.jsonl",
        reference=f"{R}/reference.jsonl",
    output:
        per_item=f"{EVAL}/nll/items.jsonl",
        summary=f"{EVAL}/nll/summary.json",
    params:
        settings=settings(seed=config["seed"], chat_template=config["models"]["chat_template"],
                          nll=section("evaluation.nll")),
    log:
        f"{LOGS}/eval/{{student}}/nll.log",
    benchmark:
        f"{BENCH}/eval/{{student}}/nll.tsv"
    threads: THREADS
    resources:
        mem_mb=memory_mb("nll"),
        runtime=60,
        **gpu_job(GPUS),
    conda:
        "../envs/evaluation.yaml"
    shell:
        montessori("eval_nll") + " --student {input.student} --seed-pool {input.seed_pool}"
        + " --reference {input.reference} --out {output.per_item} --summary {output.summary}"
        + " --name {wildcards.student} > {log} 2>&1"
