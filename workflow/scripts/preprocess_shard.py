from cxrflow.cli import script
from cxrflow.pipeline import run_preprocess_shard

with script(snakemake):
    run_preprocess_shard(
        snakemake.input.candidates,
        int(snakemake.wildcards.shard),
        snakemake.params.n_shards,
        snakemake.params.image,
        snakemake.output.table,
        snakemake.output.tensors,
    )
