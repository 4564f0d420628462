rule ingest:
    input:
        unpack(ingest_inputs),
    output:
        catalog="results/catalog.parquet",
        ledger="results/ingest/ledger.csv",
        summary="results/ingest/summary.json",
        private_catalog="results/private/catalog.parquet",
        private_ledger="results/private/ingest/ledger.csv",
    log:
        "results/logs/ingest.log",
    conda:
        "../../envs/data.yaml"
    # Worker processes for reading a DICOM folder's headers; a table is read in one. Snakemake caps this at --cores.
    threads: 8
    params:
        source=config["source"],
        privacy=config["privacy"],
    script:
        "../scripts/ingest.py"
