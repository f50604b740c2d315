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


def alpaca_reference_outputs(student: str, reference: str) -> str | None:
    """The outputs file a reference label stands for: None for the dataset's own reference outputs,
    else the student outputs of the reference's method (the paper's setting)."""
    reference = alpaca_references()[reference]
    if reference == "dataset":
        return None
    method = reference.split(":", 1)[1]
    if transfer_student(student):
        # a transfer student against itself trained on the other method's data
        return f"{R}/eval/transfer-{transfer_student(student)[0]}-{method}/alpaca_eval/outputs.json"
    round_k = student.rsplit("-round", 1)[1] if "-round" in student else "1"
    return f"{R}/eval/{method}-round{round_k}/alpaca_eval/outputs.json"


def alpaca_reference_inputs(wildcards) -> list[str]:
    """The other students' outputs the AlpacaEval judging of this student compares against."""
    outputs = (alpaca_reference_outputs(wildcards.student, label) for label in alpaca_references())
    return sorted({path for path in outputs if path})


def reference_arguments(wildcards) -> str:
    """`label=path` per reference, in the order of the rule's per-reference outputs."""
    source = config["evaluation"]["alpaca_eval"]["source"]
    return " ".join(f"{label}={alpaca_reference_outputs(wildcards.student, label) or source}"
                    for label in alpaca_references())


def per_reference(name: str) -> list[str]:
    """One file per AlpacaEval reference, under vs-<label>/ (the student stays a wildcard)."""
    return [f"{EVAL}/alpaca_eval/vs-{label}/{name}" for label in alpaca_references()]


def judge_card(wildcards) -> list[str]:
    return [base_card("judge")] if JUDGE_LOADS_A_MODEL else []


def judge_option(wildcards, input) -> str:
    return f"--judge {input.judge}" if input.get("judge") else ""


def excluded_reference(wildcards) -> list[str]:
    """The influence reference set, when it may hold evaluation instructions: those are not evaluated."""
    return [f"{R}/reference.jsonl"] if config["influence"]["reference"]["allow_eval_contamination"] else []


def exclude_option(wildcards, input) -> str:
    return f"--exclude {input.exclude}" if input.get("exclude") else ""


rule eval_generate:
    """The student's AlpacaEval outputs and MT-Bench answers, from one load of its generator."""
    input:
        student=lambda w: evaluated_student_card(w.student),
        exclude=excluded_reference,
    output:
        alpaca_eval=f"{EVAL}/alpaca_eval/outputs.json",
        selection=f"{EVAL}/alpaca_eval/selection.json",
        mt_bench=f"{EVAL}/mt_bench/answers.jsonl",
    params:
        settings=eval_settings(alpaca_eval=alpaca_section("source", "limit", "max_new_tokens", "temperature"),
                               mt_bench=section("evaluation.mt_bench", drop=("reference_answers", "judge_prompts"))),
        exclude=exclude_option,
    log:
        f"{LOGS}/eval/{{student}}/generate.log",
    benchmark:
        f"{BENCH}/eval/{{student}}/generate.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=240,
        **gpu_job(GPUS),
    conda:
        "../envs/generation.yaml"
    shell:
        montessori("eval_generate") + " --student {input.student} --alpaca-out {output.alpaca_eval}"
        + " --selection {output.selection} --mt-bench-out {output.mt_bench} {params.exclude}"
        + " --name {wildcards.student} > {log} 2>&1"


rule eval_judge:
    """AlpacaEval pairwise preferences against every reference, and MT-Bench single-answer grading
    1-10 (references for math/reasoning/coding), from one load of the judge; judgements cached."""
    input:
        outputs=f"{EVAL}/alpaca_eval/outputs.json",
        references=alpaca_reference_inputs,
        answers=f"{EVAL}/mt_bench/answers.jsonl",
        judge=judge_card,
    output:
        annotations=per_reference("annotations.json"),
        metrics=per_reference("metrics.json"),
        judgments=f"{EVAL}/mt_bench/judgment.jsonl",
        scores=f"{EVAL}/mt_bench/scores.json",
    params:
        settings=eval_settings(judging=True, judge=config["evaluation"]["judge"],
                               alpaca_eval=alpaca_section("source", "instruction_difficulty", "gamed_annotations",
                                                          "position_bias_sample"),
                               mt_bench=section("evaluation.mt_bench", drop=("limit", "max_new_tokens"))),
        references=reference_arguments,
        caches=per_reference("judge_cache.jsonl"),
        mt_bench_cache=f"{EVAL}/mt_bench/judge_cache.jsonl",
        judge=judge_option,
    log:
        f"{LOGS}/eval/{{student}}/judge.log",
    benchmark:
        f"{BENCH}/eval/{{student}}/judge.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=240,
        **judge_job(),
    conda:
        "../envs/generation.yaml"
    shell:
        montessori("eval_judge")
        + " --outputs {input.outputs} --reference-paths {params.references} --annotations-paths {output.annotations}"
        + " --metrics-paths {output.metrics} --cache-paths {params.caches} --answers {input.answers}"
        + " --judgments {output.judgments} --scores {output.scores} --mt-bench-cache {params.mt_bench_cache}"
        + " {params.judge} > {log} 2>&1"


rule eval_score:
    """Judge-free scores: the NLL of held-out strong answers (items in the seed pool or the reference
    set are dropped and counted, so it never scores what the pipeline trains on), then lm-eval-harness."""
    input:
        student=lambda w: evaluated_student_card(w.student),
        seed_pool=f"{R}/seed_pool.jsonl",
        reference=f"{R}/reference.jsonl",
    output:
        nll_items=f"{EVAL}/nll/items.jsonl",
        nll_summary=f"{EVAL}/nll/summary.json",
        lm_eval=f"{EVAL}/lm_eval/results.json",
    params:
        settings=eval_settings(nll=section("evaluation.nll"), lm_eval=section("evaluation.lm_eval")),
    log:
        f"{LOGS}/eval/{{student}}/score.log",
    benchmark:
        f"{BENCH}/eval/{{student}}/score.tsv"
    threads: THREADS
    resources:
        # 32 GB for lm-eval, or the NLL forward's request if larger
        mem_mb=lambda wildcards, attempt: max(32000 * attempt, memory_mb("nll")(wildcards, attempt)),
        runtime=300,
        **gpu_job(GPUS),
    conda:
        "../envs/evaluation.yaml"
    shell:
        montessori("eval_score") + " --student {input.student} --seed-pool {input.seed_pool}"
        + " --reference {input.reference} --nll-items {output.nll_items} --nll-summary {output.nll_summary}"
        + " --lm-eval-out {output.lm_eval} --name {wildcards.student} > {log} 2>&1"
