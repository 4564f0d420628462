from cxrflow.cli import script
from cxrflow.pipeline import run_quality

with script(snakemake):
    run_quality(
        snakemake.input.tables,
        snakemake.input.tensors,
        snakemake.input.catalog,
        snakemake.params.quality,
        snakemake.output.metrics,
        snakemake.output.summary,
        snakemake.output.sheets,
    )
