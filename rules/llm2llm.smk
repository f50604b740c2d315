# The LLM2LLM baseline (method `llm2llm`, montessori/llm2llm.py, docs/methods.md). Round k is
# LLM2LLM's iteration k; its data and student live under R/round<k>/llm2llm/:
#
#   round0/llm2llm/seeds/          D_0: seed instructions (llm2llm_seeds), answered by the teacher
#                                  through the synthesis rules (synth_responses, merge_responses)
#   round0/llm2llm/train/          D_0 as a training set; round0/llm2llm/student.done = the student
#                                  fine-tuned on it (sft_student), never evaluated: it only scores
#   round<k>/llm2llm/hard.jsonl    the seed examples with the highest loss under round k-1's student
#   round<k>/llm2llm/augment/      the teacher's new instructions from them (llm2llm_augment), answered
#                                  by the synthesis rules
#   round<k>/llm2llm/train/        D_k = D_{k-1} + the answered augmentations; sft_student trains the
#                                  untrained student on it (student_card in rules/common.smk)

from montessori.llm2llm import default_seed_size

LLM2LLM = config["llm2llm"]
LLM2LLM_SEED_SIZE = LLM2LLM["seed_size"] or default_seed_size(config["train_set"]["size"])
LLM2LLM_SEEDS = f"{R}/round0/llm2llm/seeds"


localrules:
    llm2llm_seeds,
    llm2llm_training_set,


# Both write an instructions.jsonl that merge_instructions could also make for these sets (their
# SET names are in SET_PATTERN for the response rules): theirs come from the rules here.
ruleorder: llm2llm_seeds > merge_instructions
ruleorder: llm2llm_augment > merge_instructions


rule llm2llm_seeds:
    """D_0's instructions: a seeded sample of llm2llm.seed_size seeds (the teacher answers them)."""
    input:
        seed_pool=f"{R}/seed_pool.jsonl",
    output:
        f"{LLM2LLM_SEEDS}/instructions.jsonl",
    params:
        settings=settings(seed_size=LLM2LLM_SEED_SIZE, seed=config["seed"]),
    log:
        f"{LOGS}/round0/llm2llm/seeds.log",
    benchmark:
        f"{BENCH}/round0/llm2llm/seeds.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("llm2llm_seeds") + " --seed-pool {input.seed_pool} --out {output} > {log} 2>&1"


def llm2llm_training_inputs(wildcards) -> dict:
    """Round 0: D_0; round k: round k-1's set and this round's answered augmentations."""
    k = int(wildcards.k)
    if k == 0:
        return {"previous": f"{LLM2LLM_SEEDS}/responses.jsonl"}
    return {"previous": f"{R}/round{k - 1}/llm2llm/train/responses.jsonl",
            "added": f"{R}/round{k}/llm2llm/augment/responses.jsonl"}


def llm2llm_added_option(wildcards, input) -> str:
    return f"--added {input.added}" if input.get("added") else ""


rule llm2llm_training_set:
    """D_k = D_{k-1} followed by round k's answered augmentations (round 0: D_0 itself)."""
    input:
        unpack(llm2llm_training_inputs),
    output:
        f"{R}/round{{k}}/llm2llm/train/responses.jsonl",
    params:
        settings=settings(),
        added=llm2llm_added_option,
    log:
        f"{LOGS}/round{{k}}/llm2llm/training_set.log",
    benchmark:
        f"{BENCH}/round{{k}}/llm2llm/training_set.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **cpu_job(),
    conda:
        "../envs/base.yaml"
    shell:
        montessori("llm2llm_training_set") + " --previous {input.previous} {params.added} --out {output}"
        + " > {log} 2>&1"


rule llm2llm_hard_examples:
    """Round k-1's student scores every D_0 example; the llm2llm.hard_fraction with the highest loss."""
    input:
        student=lambda w: f"{R}/round{int(w.k) - 1}/llm2llm/student.done",
        seeds=f"{LLM2LLM_SEEDS}/responses.jsonl",
    output:
        hard=f"{R}/round{{k}}/llm2llm/hard.jsonl",
        summary=f"{R}/round{{k}}/llm2llm/hard_summary.json",
    wildcard_constraints:
        k=r"[1-9]\d*",
    params:
        settings=settings(hard_fraction=LLM2LLM["hard_fraction"], max_length=config["sft"]["max_length"],
                          batch_size=config["sft"]["batch_size"], chat_template=config["models"]["chat_template"]),
    log:
        f"{LOGS}/round{{k}}/llm2llm/hard_examples.log",
    benchmark:
        f"{BENCH}/round{{k}}/llm2llm/hard_examples.tsv"
    threads: THREADS
    resources:
        mem_mb=memory_mb("nll"),
        runtime=60,
        **gpu_job(GPUS),
    conda:
        "../envs/evaluation.yaml"
    shell:
        montessori("llm2llm_hard_examples") + " --student {input.student} --seeds {input.seeds}"
        + " --out {output.hard} --summary {output.summary} > {log} 2>&1"


rule llm2llm_augment:
    """The untrained teacher writes one new instruction from each hard seed (synthesis.n tries each)."""
    input:
        hard=f"{R}/round{{k}}/llm2llm/hard.jsonl",
        teacher=base_card("teacher"),
        training_set=lambda w: f"{R}/round{int(w.k) - 1}/llm2llm/train/responses.jsonl",
    output:
        instructions=f"{R}/round{{k}}/llm2llm/augment/instructions.jsonl",
        summary=f"{R}/round{{k}}/llm2llm/augment/augment_summary.json",
        candidates=kept(f"{R}/round{{k}}/llm2llm/augment/candidates.jsonl", "synthesis_shards"),
    wildcard_constraints:
        k=r"[1-9]\d*",
    params:
        settings=lambda w: settings_json(
            **section("synthesis", drop=("response_sampling", "shards", "oversample", "max_prompts_factor",
                                         "prompt_examples", "generated_examples", "generated_pool_refresh")),
            backend=config["backend"],
            seed=config["seed"],
            label=f"r{w.k}-llm2llm-augment",
        ),
    log:
        f"{LOGS}/round{{k}}/llm2llm/augment.log",
    benchmark:
        f"{BENCH}/round{{k}}/llm2llm/augment.tsv"
    threads: THREADS
    resources:
        mem_mb=32000,
        runtime=240,
        **gpu_job(GPUS),
    conda:
        "../envs/generation.yaml"
    shell:
        montessori("llm2llm_augment") + " --hard {input.hard} --teacher {input.teacher}"
        + " --training-set {input.training_set} --candidates {output.candidates} --out {output.instructions}"
        + " --summary {output.summary} > {log} 2>&1"
