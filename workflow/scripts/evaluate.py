from cxrflow.cli import script
from cxrflow.pipeline import run_evaluate

with script(snakemake):
    run_evaluate(
        snakemake.input.model,
        snakemake.input.metadata,
        snakemake.input.manifest,
        snakemake.input.index,
        snakemake.input.tensors,
        snakemake.params.config,
        snakemake.wildcards.pathology,
        snakemake.output.metrics,
        snakemake.output.predictions,
        snakemake.output.roc,
        history_path=snakemake.input.history,
        confusion_out=snakemake.output.confusion,
        curves_out=snakemake.output.curves,
        gradcam_out=snakemake.output.gradcam,
        catalog_path=snakemake.input.catalog,
        reliability_out=snakemake.output.reliability,
        threshold_out=snakemake.output.threshold,
        label_out=snakemake.output.label,
        subgroups_out=snakemake.output.subgroups,
        threads=snakemake.threads,
    )
