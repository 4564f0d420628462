from cxrflow.cli import script
from cxrflow.pipeline import run_cohort

with script(snakemake):
    run_cohort(
        snakemake.input.catalog,
        snakemake.input.get("quality"),
        snakemake.input.label_keys,
        snakemake.params.cohorts,
        snakemake.wildcards.pathology,
        snakemake.params.seed,
        snakemake.output.cohort,
        snakemake.output.flow,
        snakemake.output.figure,
        duplicates_path=snakemake.input.get("duplicates"),
    )
