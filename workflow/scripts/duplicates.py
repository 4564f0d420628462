from cxrflow.cli import script
from cxrflow.pipeline import run_duplicates

with script(snakemake):
    run_duplicates(
        snakemake.input.tables,
        snakemake.params.near_bits,
        snakemake.output.duplicates,
        catalog_path=snakemake.input.catalog,
    )
