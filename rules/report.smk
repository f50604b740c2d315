# The last target: one table (students x metrics), the paired bootstrap differences between
# students, plots, and the cost of every stage.


def report_inputs(kind: str) -> list[str]:
    students = evaluated_students()
    paths = {
        "alpaca": [f"{R}/eval/{s}/alpaca_eval/vs-{label}/metrics.json" for s in students
                   for label in alpaca_references()],
        "mt_bench": [f"{R}/eval/{s}/mt_bench/scores.json" for s in students],
        "lm_eval": [f"{R}/eval/{s}/lm_eval/results.json" for s in students],
        "nll": [f"{R}/eval/{s}/nll/summary.json" for s in students],
        # read beside the summaries above (montessori/report.py): declared so that they are tracked
        "per_item": ([f"{R}/eval/{s}/alpaca_eval/vs-{label}/annotations.json" for s in students
                      for label in alpaca_references()]
                     + [f"{R}/eval/{s}/mt_bench/judgment.jsonl" for s in students]
                     + [f"{R}/eval/{s}/nll/items.jsonl" for s in students]),
        "influence": [f"{R}/round{k}/influence/histogram.png" for k in ROUNDS]
                     if "montessori" in METHODS and PAIRS_FROM_INFLUENCE else [],
        "dpo_loss": [f"{R}/round{k}/teacher_loss.json" for k in ROUNDS] if "montessori" in METHODS else [],
        "sft_loss": [f"{R}/round{k}/{m}/student_loss.json" for k in ROUNDS for m in METHODS],
    }
    return paths[kind]


def optional_paths(option: str, kind: str) -> str:
    paths = report_inputs(kind)
    return f"{option} {' '.join(paths)}" if paths else ""


rule report:
    input:
        alpaca=report_inputs("alpaca"),
        mt_bench=report_inputs("mt_bench"),
        lm_eval=report_inputs("lm_eval"),
        nll=report_inputs("nll"),
        per_item=report_inputs("per_item"),
        influence=report_inputs("influence"),
        dpo_loss=report_inputs("dpo_loss"),
        sft_loss=report_inputs("sft_loss"),
        analysis=analysis_figure_paths(),
        # Every student is evaluated on the same instructions: the untrained one's record says which.
        alpaca_selection=f"{R}/eval/base/alpaca_eval/selection.json",
    output:
        md=REPORT,
        csv=report(f"{R}/report.csv", caption="../report/results.rst", category="Results"),
        figures=report(directory(f"{R}/figures"), patterns=["{name}.png"], caption="../report/report_figures.rst",
                       category="Figures"),
    params:
        settings=settings(
            run=config["run"],
            seed=config["seed"],
            judge=config["evaluation"]["judge"],
            alpaca_eval=config["evaluation"]["alpaca_eval"],
            # named only when it is not the paper's, so the main run's report job is unchanged
            **({} if TEACHER_OPTIMIZATION == "dpo_instructions" else {"teacher_optimization": TEACHER_OPTIMIZATION}),
        ),
        influence=optional_paths("--influence-histogram-paths", "influence"),
        dpo_loss=optional_paths("--dpo-loss-paths", "dpo_loss"),
        # Every job upstream has finished, so its benchmark file is there to be read.
        benchmarks=BENCH,
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("report")
        + " --out-md {output.md} --out-csv {output.csv} --figures {output.figures}"
        + " --alpaca-paths {input.alpaca} --mt-bench-paths {input.mt_bench} --lm-eval-paths {input.lm_eval}"
        + " --nll-paths {input.nll}"
        + " --sft-loss-paths {input.sft_loss} {params.influence} {params.dpo_loss}"
        + " --analysis-figure-paths {input.analysis}"
        + " --alpaca-selection {input.alpaca_selection}"
        + " --benchmark-paths $(find {params.benchmarks} -name '*.tsv' ! -name report.tsv | sort) > {log} 2>&1"
