# Montessori-Instruct: a teacher LLM learns, by DPO, to write training data that helps its student.
#
#   snakemake --cores 2                       run the embedded default (config.yaml) on a CPU
#   snakemake -n                              dry run: the jobs that would run
#   snakemake --profile slurm --configfile presets/llama3-8b.yaml    a SLURM cluster (docs/cluster.md)
#
# This file is parsed again inside every cluster job: keep its top level light (no torch).

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


# `snakemake --report report.html`: this page, then every output declared with report(...).
report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/synthesis.smk"
include: "rules/influence.smk"
include: "rules/training.smk"
include: "rules/evaluation.smk"
include: "rules/methods.smk"
include: "rules/self_reward.smk"
include: "rules/teacheropt.smk"
include: "rules/llm2llm.smk"
include: "rules/figures.smk"
include: "rules/report.smk"


rule all:
    input:
        REPORT,
        storage_cleanup(),
    default_target: True
