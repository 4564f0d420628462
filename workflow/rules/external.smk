# External evaluation, "trained here, tested there": the trained models on each source named under `external:`
# (config/external-example.yaml), e.g.
#   snakemake --cores all results/external/site2/metrics_table.md --configfile config/external-example.yaml
# Each external source is ingested with its own tables and label map or vocabulary (rule external_catalog), then
# decoded, QC'd and made into cohorts under the main run's rules and scored by each model at the threshold of its
# model folder (rule external; cxrflow.external says what is decided how).
rule external_catalog:
    """Reads identifiers: the external source (notes, ids, paths, dates). Writes them only under
    results/private/external/; the shareable catalog and ledger hold pseudonyms."""
    input:
        unpack(external_catalog_inputs),
    output:
        catalog="results/external/{name}/catalog.parquet",
        ledger="results/external/{name}/ingest/ledger.csv",
        summary="results/external/{name}/ingest/summary.json",
        private_catalog="results/private/external/{name}/catalog.parquet",
        private_ledger="results/private/external/{name}/ingest/ledger.csv",
    log:
        "results/logs/external_catalog/{name}.log",
    benchmark:
        "results/benchmarks/external_catalog/{name}.tsv"
    wildcard_constraints:
        name="|".join(EXTERNAL) or "(?!)",  # no external source: the rules match nothing
    conda:
        "../../envs/data.yaml"
    threads: 8
    params:
        source=external_source_settings,
        privacy=config["privacy"],
        # Not read by the job: a new key changes this, so Snakemake rebuilds the pseudonyms.
        key=KEY_FINGERPRINT,
    script:
        "../scripts/ingest.py"


rule external:
    """Reads file paths (the private catalog) only to decode the cohorts' images; writes pseudonyms and counts."""
    input:
        unpack(external_inputs),
    output:
        metrics=expand("results/external/{{name}}/metrics/{pathology}.json", pathology=PATHOLOGIES),
        predictions=expand(
            "results/external/{{name}}/predictions/{pathology}.csv", pathology=PATHOLOGIES
        ),
        table="results/external/{name}/metrics_table.csv",
        markdown=report(
            "results/external/{name}/metrics_table.md",
            caption="../report/external.rst",
            category="External evaluation",
            subcategory="{name}",
        ),
        clinical="results/external/{name}/clinical_table.csv",
        clinical_markdown="results/external/{name}/clinical_table.md",
        flow="results/external/{name}/flow.csv",
        quality="results/private/external/{name}/quality.parquet",
    log:
        "results/logs/external/{name}.log",
    benchmark:
        "results/benchmarks/external/{name}.tsv"
    wildcard_constraints:
        name="|".join(EXTERNAL) or "(?!)",  # no external source: the rules match nothing
    retries: 2
    conda:
        "../../envs/train.yaml"
    # Decoding runs in `threads` processes; predicting streams batches from the decoded cache (as evaluate does).
    threads: 4
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        pathologies=PATHOLOGIES,
        config=external_settings(),
    script:
        "../scripts/external.py"
