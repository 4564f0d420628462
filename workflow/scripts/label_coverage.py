from cxrflow.cli import script
from cxrflow.pipeline import run_label_coverage

with script(snakemake):
    run_label_coverage(
        snakemake.input.catalog,
        snakemake.input.get("vocabulary"),
        snakemake.input.label_keys,
        snakemake.params.settings,
        snakemake.output.coverage,
        snakemake.output.unmatched,
        snakemake.output.near_misses,
    )
