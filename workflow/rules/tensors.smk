# One pass per image, in shards: decode -> QC metrics -> normalized uint8 tensor.
# The shard tables are not temp(): quality, duplicates and tensor_index read them again when their own settings
# change, and remaking a table would rewrite its tensors too and so retrain every model.
rule preprocess_shard:
    """Reads identifiers: the files' paths in the private catalog. Writes pixels and counts keyed by pseudonyms."""
    input:
        catalog="results/private/catalog.parquet",
    output:
        table="results/preprocess/shards/{shard}.parquet",
        tensors="results/tensors/shard_{shard}.npy",
    log:
        "results/logs/preprocess/{shard}.log",
    benchmark:
        "results/benchmarks/preprocess/{shard}.tsv"
    retries: 2
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        n_shards=config["preprocess"]["shards"],
        image=shard_image_settings(),
    script:
        "../scripts/preprocess_shard.py"


rule tensor_index:
    input:
        unpack(preprocess_shards),
    output:
        index="results/tensors/index.parquet",
    log:
        "results/logs/tensor_index.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/tensor_index.py"
