rule ingest:
    input:
        unpack(ingest_inputs),
    output:
        catalog="results/catalog.parquet",
        ledger="results/ingest/ledger.csv",
        summary="results/ingest/summary.json",
    log:
        "results/logs/ingest.log",
    conda:
        "../../envs/data.yaml"
    params:
        source=config["source"],
        privacy=config["privacy"],
    script:
        "../scripts/ingest.py"
