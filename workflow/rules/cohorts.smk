rule cohort:
    input:
        catalog="results/catalog.parquet",
        quality="results/quality/metrics.parquet",
        label_keys=config["labels"]["keys"],
    output:
        cohort="results/cohorts/{pathology}.parquet",
        flow="results/cohorts/{pathology}_flow.csv",
    log:
        "results/logs/cohort/{pathology}.log",
    conda:
        "../../envs/data.yaml"
    params:
        cohorts=config["cohorts"],
        seed=config["seed"],
    script:
        "../scripts/cohort.py"


rule cohort_flows:
    input:
        flows=expand("results/cohorts/{pathology}_flow.csv", pathology=PATHOLOGIES),
    output:
        summary="results/cohorts/flow_summary.csv",
        figure=report(
            "results/cohorts/flow.png",
            caption="../report/flow.rst",
            category="Cohorts",
        ),
    log:
        "results/logs/cohort_flows.log",
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/cohort_flows.py"
