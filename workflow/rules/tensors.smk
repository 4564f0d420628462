# One pass per image, in shards: decode -> QC metrics -> normalized uint8 tensor.
rule preprocess_shard:
    input:
        catalog="results/catalog.parquet",
    output:
        table="results/preprocess/shards/{shard}.parquet",
        tensors="results/tensors/shard_{shard}.npy",
    log:
        "results/logs/preprocess/{shard}.log",
    benchmark:
        "results/benchmarks/preprocess/{shard}.tsv"
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
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/tensor_index.py"
