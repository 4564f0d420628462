# Multi-label mode (train.mode: multilabel, cxrflow.multilabel): one patient-level split shared by every cohort and
# one network with an output per enabled pathology. Evaluation stays per pathology (evaluate.smk), reading the one
# checkpoint, so the metrics table compares row by row with a binary run (split.shared: true gives it the same split).


rule split_shared:
    input:
        unpack(shared_split_inputs),
    output:
        manifests=expand("results/splits/{pathology}.csv", pathology=PATHOLOGIES),
    log:
        "results/logs/split/shared.log",
    localrule: True
    conda:
        "../../envs/train.yaml"  # cxrflow.multilabel imports torch
    params:
        pathologies=PATHOLOGIES,
        split=config["split"],
        seed=config["seed"],
    script:
        "../scripts/split_shared.py"


rule train_multilabel:
    input:
        unpack(multilabel_training_inputs),
    output:
        model="results/models/multilabel/model.pt",
        metadata="results/models/multilabel/metadata.json",
        history="results/models/multilabel/history.csv",
    log:
        "results/logs/train/multilabel.log",
    benchmark:
        "results/benchmarks/train/multilabel.tsv"
    retries: 2
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=720,
    params:
        pathologies=PATHOLOGIES,
        config=multilabel_training_settings(),
    script:
        "../scripts/train_multilabel.py"


# The per-cohort split or the shared one make the same manifests; the config says which.
if SHARED_SPLIT:

    ruleorder: split_shared > split

else:

    ruleorder: split > split_shared
