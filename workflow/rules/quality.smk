rule quality:
    input:
        unpack(preprocess_shards),
        catalog="results/catalog.parquet",
    output:
        metrics="results/quality/metrics.parquet",
        summary=report(
            "results/quality/summary.png",
            caption="../report/quality.rst",
            category="Quality control",
        ),
        sheets=directory("results/quality/rejects"),
    log:
        "results/logs/quality.log",
    conda:
        "../../envs/data.yaml"
    params:
        quality=config["quality"],
    script:
        "../scripts/quality.py"
