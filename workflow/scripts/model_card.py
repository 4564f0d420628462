from cxrflow.cli import script
from cxrflow.pipeline import run_model_card

with script(snakemake):
    run_model_card(
        snakemake.input.metadata,
        snakemake.input.threshold,
        snakemake.input.metrics,
        snakemake.input.flow,
        snakemake.input.manifest,
        snakemake.params.config,
        snakemake.wildcards.pathology,
        snakemake.output.card,
        snakemake.output.json,
    )
