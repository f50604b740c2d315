# The paper's analysis figures (montessori/figures.py), from files the earlier stages write:
# influence per round, the share of helpful probes, lengths of the synthesized sets, the
# teacher's DPO rewards. DPO exists only with the montessori method, influence only when its
# pairs come from influence (pairs.signal influence or loss).

ANALYSIS = f"{R}/analysis"
TEACHER_LEARNS = "montessori" in METHODS
INFLUENCE_SCORED = TEACHER_LEARNS and PAIRS_FROM_INFLUENCE
# teacher_optimization bootstrap fine-tunes the teacher without DPO: no rewards to draw.
DPO_REWARDS = TEACHER_LEARNS and TEACHER_OPTIMIZATION != "bootstrap"


def analysis_figure_outputs() -> dict:
    """Output name -> path (declared for the HTML report with its caption, report/<name>.rst)."""
    def figure(name: str, title: str):
        return report(f"{ANALYSIS}/{name}.png", caption=f"../report/{name}.rst", category="Analysis",
                      labels={"figure": title})

    outputs = {"lengths": figure("lengths", "instruction and response lengths")}
    if INFLUENCE_SCORED:
        outputs |= {
            "influence": figure("influence", "influence per round"),
            "helpful_share": figure("helpful_share", "helpful probes per round"),
        }
    if DPO_REWARDS:
        outputs["dpo_rewards"] = figure("dpo_rewards", "teacher DPO rewards")
    return outputs


def analysis_figure_paths() -> list[str]:
    """The figures the report links to."""
    return [str(path) for path in analysis_figure_outputs().values()]


def synthesized_sets() -> list[str]:
    """Every round's probes (montessori only) and each method's training set (self_reward: the
    student's candidate answers, it has no SFT set)."""
    probes = [f"{R}/round{k}/probes/responses.jsonl" for k in ROUNDS] if TEACHER_LEARNS else []
    return probes + [f"{R}/round{k}/self_reward/candidates.jsonl" if m == "self_reward"
                     else f"{R}/round{k}/{m}/train/responses.jsonl" for k in ROUNDS for m in METHODS]


rule analysis_figures:
    input:
        sets=synthesized_sets(),
        influence=[f"{R}/round{k}/influence/influence.jsonl" for k in ROUNDS] if INFLUENCE_SCORED else [],
        teacher_loss=[f"{R}/round{k}/teacher_loss.json" for k in ROUNDS] if DPO_REWARDS else [],
    output:
        numbers=f"{ANALYSIS}/numbers.json",
        **analysis_figure_outputs(),
    params:
        settings=settings(),
    log:
        f"{LOGS}/analysis_figures.log",
    benchmark:
        f"{BENCH}/analysis_figures.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("analysis_figures")
        + " --set-paths {input.sets} --lengths-png {output.lengths} --numbers {output.numbers}"
        + (" --influence-paths {input.influence} --influence-png {output.influence}"
           " --helpful-share-png {output.helpful_share}" if INFLUENCE_SCORED else "")
        + (" --teacher-loss-paths {input.teacher_loss} --dpo-rewards-png {output.dpo_rewards}"
           if DPO_REWARDS else "")
        + " > {log} 2>&1"
