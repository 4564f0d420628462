from cxrflow.cli import script
from cxrflow.pipeline import run_label_audit_sheets

with script(snakemake):
    run_label_audit_sheets(
        snakemake.input.catalog,
        snakemake.input.get("vocabulary"),
        snakemake.input.label_keys,
        snakemake.params.per_state,
        snakemake.params.seed,
        snakemake.output.sheets,
    )
