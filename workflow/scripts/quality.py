from cxrflow.cli import script
from cxrflow.pipeline import run_quality

with script(snakemake):
    run_quality(
        snakemake.input.tables,
        snakemake.input.tensors,
        snakemake.input.catalog,
        snakemake.input.ingest_ledger,
        snakemake.params.quality,
        snakemake.output.metrics,
        snakemake.output.summary,
        snakemake.output.sheets,
        snakemake.output.ledger,
        prefiltered_path=snakemake.input.prefiltered,
    )
