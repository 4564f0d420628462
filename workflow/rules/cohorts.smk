# One job per cohort, so that editing one cohort's config reruns only that cohort (cohort_settings passes
# only what it depends on). A cohort whose target the source never labels fails with a message naming it;
# leave such cohorts out with `cohorts.enabled` (config/padchest.yaml). The cohort file keeps the eligible
# images that balancing left out (selected: false) for a natural-prevalence test split; with
# split.duplicates: drop it reads the duplicate table and keeps one image per group.
rule cohort:
    input:
        unpack(cohort_inputs),
    output:
        cohort="results/cohorts/{pathology}.parquet",
        flow="results/cohorts/{pathology}_flow.csv",
        figure=report(
            "results/cohorts/{pathology}_flow.png",
            caption="../report/cohort_flow.rst",
            category="Cohorts",
            subcategory="{pathology}",
        ),
    log:
        "results/logs/cohort/{pathology}.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        cohorts=cohort_settings,
        seed=config["seed"],
    script:
        "../scripts/cohort.py"


rule cohort_flows:
    input:
        flows=expand("results/cohorts/{pathology}_flow.csv", pathology=PATHOLOGIES),
    output:
        summary=report(
            "results/cohorts/flow_summary.csv",
            caption="../report/flow_summary.rst",
            category="Cohorts",
        ),
        figure=report(
            "results/cohorts/flow.png",
            caption="../report/flow.rst",
            category="Cohorts",
        ),
    log:
        "results/logs/cohort_flows.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/cohort_flows.py"
