from cxrflow.cli import script
from cxrflow.pipeline import run_split

with script(snakemake):
    run_split(
        snakemake.input.cohort,
        snakemake.params.split,
        snakemake.params.seed,
        snakemake.wildcards.pathology,
        snakemake.output.manifest,
        duplicates_path=snakemake.input.get("duplicates"),
    )
