from cxrflow.cli import script
from cxrflow.multilabel import run_train_multilabel

with script(snakemake) as log:
    run_train_multilabel(
        dict(zip(snakemake.params.pathologies, snakemake.input.manifests)),
        snakemake.input.index,
        snakemake.input.tensors,
        snakemake.params.config,
        snakemake.output.model,
        snakemake.output.metadata,
        snakemake.output.history,
        catalog_path=snakemake.input.get("catalog"),
        quality_path=snakemake.input.get("quality"),
        duplicates_path=snakemake.input.get("duplicates"),
        threads=snakemake.threads,
        log=log.info,
    )
