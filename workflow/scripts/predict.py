from cxrflow.cli import script
from cxrflow.pipeline import run_predict

with script(snakemake):
    run_predict(
        snakemake.input.images,
        snakemake.input.models,
        snakemake.input.metadata,
        snakemake.input.thresholds,
        snakemake.params.pathologies,
        snakemake.params.quality,
        snakemake.output.probabilities,
        threads=snakemake.threads,
    )
