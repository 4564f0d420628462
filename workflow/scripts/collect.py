from cxrflow.cli import script
from cxrflow.pipeline import run_collect

with script(snakemake):
    run_collect(
        snakemake.input.metrics,
        snakemake.input.manifests,
        snakemake.input.predictions,
        snakemake.params.pathologies,
        snakemake.params.names,
        snakemake.output.table,
        snakemake.output.markdown,
        snakemake.output.roc,
    )
