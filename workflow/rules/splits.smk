# One manifest per cohort, written once; training and evaluation read it and never split again.
# A cohort too small to split fails naming its counts; `snakemake --keep-going` lets the others finish.
rule split:
    input:
        cohort="results/cohorts/{pathology}.parquet",
    output:
        manifest="results/splits/{pathology}.csv",
    log:
        "results/logs/split/{pathology}.log",
    conda:
        "../../envs/data.yaml"
    params:
        split=config["split"],
        seed=config["seed"],
    script:
        "../scripts/split.py"
