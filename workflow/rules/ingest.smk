# Two branches start at the source and meet at the cohort (tensor_index, quality and duplicates translate pixel ids
# to pseudonyms there). The pixel branch (image_index -> candidates -> preprocess_shard) sees no vocabulary, label
# map, label key or pseudonym key, so that a label edit or a new key re-decodes no image.


rule image_index:
    """Reads identifiers: the source's tables and file paths. Writes them only to results/private/images.parquet."""
    input:
        unpack(image_index_inputs),
    output:
        images="results/private/images.parquet",
    log:
        "results/logs/image_index.log",
    benchmark:
        "results/benchmarks/image_index.tsv"
    conda:
        "../../envs/data.yaml"
    # Worker processes for reading a DICOM folder's headers; a table is read in one. Snakemake caps this at --cores.
    threads: 8
    params:
        source=pixel_source_settings(),
    script:
        "../scripts/image_index.py"


rule ingest:
    """Reads identifiers: the source (notes, ids, paths, dates) and the image index. Writes them only under
    results/private/; the shareable catalog and ledger hold pseudonyms."""
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
    benchmark:
        "results/benchmarks/ingest.tsv"
    conda:
        "../../envs/data.yaml"
    # Worker processes for reading a DICOM folder's headers; a table is read in one. Snakemake caps this at --cores.
    threads: 8
    params:
        source=config["source"],
        privacy=config["privacy"],
        # Not read by the job (it reads the key itself): a new key changes this, so Snakemake reruns the label branch.
        key=KEY_FINGERPRINT,
    script:
        "../scripts/ingest.py"
