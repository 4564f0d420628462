# The pixel branch: the pre-filter, then one pass per candidate image, in shards: decode -> QC metrics -> normalized
# uint8 tensor. Shards are keyed by pixel_id (results/private/images.parquet), never by a pseudonym, so that only a
# change of the images themselves (or of image.size and the other tensor settings) decodes again.


rule candidates:
    """Reads identifiers: the file paths of the image index. Writes them only to results/private/candidates.parquet;
    the images left out (pixel_id and the filter) go to results/preprocess/prefiltered.parquet."""
    input:
        images="results/private/images.parquet",
    output:
        candidates="results/private/candidates.parquet",
        prefiltered="results/preprocess/prefiltered.parquet",
    log:
        "results/logs/candidates.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        filters=candidate_filters(),
    script:
        "../scripts/candidates.py"


# The shard tables are not temp(): quality, duplicates and tensor_index read them again when their own settings
# change, and remaking a table would rewrite its tensors too and so retrain every model.
rule preprocess_shard:
    """Reads identifiers: the candidates' file paths. Writes pixels and counts keyed by pixel_id."""
    input:
        candidates="results/private/candidates.parquet",
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


# Where the branches meet: each pixel_id becomes the catalog's image pseudonym (cheap: no decoding), so that the
# cache is read by image_id downstream.
rule tensor_index:
    input:
        unpack(preprocess_shards),
        catalog="results/catalog.parquet",
    output:
        index="results/tensors/index.parquet",
    log:
        "results/logs/tensor_index.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/tensor_index.py"
