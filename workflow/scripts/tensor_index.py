from cxrflow.cli import script
from cxrflow.pipeline import run_tensor_index

with script(snakemake):
    run_tensor_index(snakemake.input.tables, snakemake.input.catalog, snakemake.output.index)
