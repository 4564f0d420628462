from cxrflow.cli import script
from cxrflow.pipeline import run_collect

with script(snakemake):
    run_collect(
        snakemake.input.metrics,
        snakemake.input.manifests,
        snakemake.input.predictions,
        snakemake.params.pathologies,
        snakemake.params.names,
        snakemake.output.table,
        snakemake.output.markdown,
        snakemake.output.roc,
        clinical_out=snakemake.output.clinical,
        clinical_markdown_out=snakemake.output.clinical_markdown,
        subgroup_files=snakemake.input.subgroups,
        subgroups_out=snakemake.output.subgroups,
        subgroups_markdown_out=snakemake.output.subgroups_markdown,
        min_subgroup_patients=snakemake.params.min_subgroup_patients,
        card_files=snakemake.input.cards,
    )
