from cxrflow.cli import script
from cxrflow.pipeline import run_label_audit_precision

with script(snakemake):
    run_label_audit_precision(
        snakemake.params.folder,
        snakemake.input.verdicts,
        snakemake.input.label_keys,
        snakemake.output.precision,
    )
