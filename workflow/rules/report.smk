rule collect:
    input:
        metrics=expand("results/metrics/{pathology}.json", pathology=PATHOLOGIES),
        manifests=expand("results/splits/{pathology}.csv", pathology=PATHOLOGIES),
        predictions=expand("results/predictions/{pathology}.csv", pathology=PATHOLOGIES),
    output:
        table=report(
            "results/metrics_table.csv",
            caption="../report/metrics_table.rst",
            category="Results",
        ),
        markdown="results/metrics_table.md",
        roc=report(
            "results/roc_all.png",
            caption="../report/roc_all.rst",
            category="Results",
        ),
    log:
        "results/logs/collect.log",
    conda:
        "../../envs/data.yaml"
    params:
        pathologies=PATHOLOGIES,
        names=pathology_names(),
    script:
        "../scripts/collect.py"
