from cxrflow.cli import script
from cxrflow.pipeline import run_image_index

with script(snakemake):
    run_image_index(snakemake.params.source, snakemake.output.images, workers=snakemake.threads)
