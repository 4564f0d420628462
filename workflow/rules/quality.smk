# Quality and duplicates read the shards by pixel_id and write by image pseudonym (the catalog translates): cheap
# jobs that rerun after a label edit, while the shards do not.
rule quality:
    input:
        unpack(preprocess_shards),
        catalog="results/catalog.parquet",
        prefiltered="results/preprocess/prefiltered.parquet",
        ingest_ledger="results/ingest/ledger.csv",
    output:
        metrics="results/quality/metrics.parquet",
        summary=report(
            "results/quality/summary.png",
            caption="../report/quality.rst",
            category="Quality control",
        ),
        # Thumbnails of patients: shareable only for the synthetic archive or with report.show_images: true.
        sheets=(
            report(
                directory("results/quality/rejects"),
                patterns=["{reason}.png"],
                caption="../report/rejects.rst",
                category="Quality control",
            )
            if SHOW_IMAGES
            else directory("results/private/quality/rejects")
        ),
        ledger="results/ledger.csv",
    log:
        "results/logs/quality.log",
    benchmark:
        "results/benchmarks/quality.tsv"
    conda:
        "../../envs/data.yaml"
    params:
        quality=quality_rules(),
    script:
        "../scripts/quality.py"


# Exact (file bytes, decoded pixels) and near (perceptual hash) duplicates, for the patient-exclusive split.
rule duplicates:
    input:
        tables=shard_tables,
        catalog="results/catalog.parquet",
    output:
        duplicates="results/quality/duplicates.parquet",
    log:
        "results/logs/duplicates.log",
    conda:
        "../../envs/data.yaml"
    params:
        near_bits=config["quality"]["near_duplicate_bits"],
    script:
        "../scripts/duplicates.py"
