from cxrflow.cli import script
from cxrflow.pipeline import run_candidates

with script(snakemake):
    run_candidates(
        snakemake.input.images,
        snakemake.params.filters,
        snakemake.output.candidates,
        snakemake.output.prefiltered,
    )
