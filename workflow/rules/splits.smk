# One manifest per cohort, written once; training and evaluation read it and never split again.
# A cohort too small to split fails naming its counts; `snakemake --keep-going` lets the others finish.
# With split.duplicates: group, the duplicate-image table (when the workflow makes it) merges patients.
rule split:
    input:
        unpack(split_inputs),
    output:
        manifest="results/splits/{pathology}.csv",
    log:
        "results/logs/split/{pathology}.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        split=config["split"],
        seed=config["seed"],
    script:
        "../scripts/split.py"
