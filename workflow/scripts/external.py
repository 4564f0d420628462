from cxrflow.cli import script
from cxrflow.pipeline import run_external

with script(snakemake):
    run_external(
        snakemake.wildcards.name,
        snakemake.input.catalog,
        snakemake.input.private_catalog,
        snakemake.input.label_keys,
        snakemake.input.models,
        snakemake.input.metadata,
        snakemake.input.thresholds,
        snakemake.input.internal_metrics,
        snakemake.params.pathologies,
        snakemake.params.config,
        snakemake.output.metrics,
        snakemake.output.predictions,
        snakemake.output.table,
        snakemake.output.markdown,
        snakemake.output.clinical,
        snakemake.output.clinical_markdown,
        snakemake.output.flow,
        snakemake.output.quality,
        threads=snakemake.threads,
    )
