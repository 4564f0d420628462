from cxrflow.cli import script
from cxrflow.multilabel import run_shared_split

with script(snakemake) as log:
    run_shared_split(
        dict(zip(snakemake.params.pathologies, snakemake.input.cohorts)),
        snakemake.params.split,
        snakemake.params.seed,
        dict(zip(snakemake.params.pathologies, snakemake.output.manifests)),
        duplicates_path=snakemake.input.get("duplicates"),
        log=log.info,
    )
