# cxrflow: raw images + annotations -> catalog -> quality control -> cohorts -> splits -> tensors
#          -> training -> evaluation -> one metrics table and report.
from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/synthesize.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/labels.smk"
include: "workflow/rules/tensors.smk"
include: "workflow/rules/quality.smk"
include: "workflow/rules/cohorts.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/multilabel.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/external.smk"


rule all:
    default_target: True
    input:
        "results/metrics_table.csv",
        "results/metrics_table.md",
        "results/clinical_table.md",
        "results/subgroups.md",
        "results/roc_all.png",
        "results/cohorts/flow_summary.csv",
        "results/quality/summary.png",
        label_targets(),
        external_targets(),
