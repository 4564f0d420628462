from cxrflow.cli import script
from cxrflow.pipeline import run_ingest

with script(snakemake):
    run_ingest(
        snakemake.params.source,
        snakemake.input.label_keys,
        snakemake.params.privacy,
        snakemake.output.catalog,
        snakemake.output.ledger,
        snakemake.output.summary,
        snakemake.output.private_catalog,
        snakemake.output.private_ledger,
        workers=snakemake.threads,
        images_path=snakemake.input.get("images"),  # none for an external source: its images are not sharded
    )
