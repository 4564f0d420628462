from cxrflow.cli import script
from cxrflow.pipeline import run_train

with script(snakemake):
    run_train(
        snakemake.input.manifest,
        snakemake.input.index,
        snakemake.input.tensors,
        snakemake.params.config,
        snakemake.wildcards.pathology,
        snakemake.output.model,
        snakemake.output.metadata,
        snakemake.output.history,
        threads=snakemake.threads,
    )
