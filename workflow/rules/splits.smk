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
