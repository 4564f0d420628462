rule collect:
    input:
        metrics=expand("results/metrics/{pathology}.json", pathology=PATHOLOGIES),
        manifests=expand("results/splits/{pathology}.csv", pathology=PATHOLOGIES),
        predictions=expand("results/predictions/{pathology}.csv", pathology=PATHOLOGIES),
        subgroups=expand("results/subgroups/{pathology}.csv", pathology=PATHOLOGIES),
        cards=expand("results/models/{pathology}/model_card.md", pathology=PATHOLOGIES),
    output:
        table=report(
            "results/metrics_table.csv",
            caption="../report/metrics_table.rst",
            category="Results",
        ),
        markdown="results/metrics_table.md",
        clinical=report(
            "results/clinical_table.csv",
            caption="../report/clinical_table.rst",
            category="Results",
        ),
        clinical_markdown="results/clinical_table.md",
        subgroups=report(
            "results/subgroups.csv",
            caption="../report/subgroups_table.rst",
            category="Results",
        ),
        subgroups_markdown="results/subgroups.md",
        roc=report(
            "results/roc_all.png",
            caption="../report/roc_all.rst",
            category="Results",
        ),
    log:
        "results/logs/collect.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        pathologies=PATHOLOGIES,
        names=pathology_names(),
        min_subgroup_patients=config["evaluate"]["min_subgroup_patients"],
    script:
        "../scripts/collect.py"
