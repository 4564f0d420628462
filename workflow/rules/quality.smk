rule quality:
    input:
        unpack(preprocess_shards),
        catalog="results/catalog.parquet",
        ingest_ledger="results/ingest/ledger.csv",
    output:
        metrics="results/quality/metrics.parquet",
        summary=report(
            "results/quality/summary.png",
            caption="../report/quality.rst",
            category="Quality control",
        ),
        sheets=report(
            directory("results/quality/rejects"),
            patterns=["{reason}.png"],
            caption="../report/rejects.rst",
            category="Quality control",
        ),
        ledger="results/ledger.csv",
    log:
        "results/logs/quality.log",
    conda:
        "../../envs/data.yaml"
    params:
        quality=config["quality"],
    script:
        "../scripts/quality.py"
