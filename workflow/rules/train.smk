rule train:
    input:
        manifest="results/splits/{pathology}.csv",
        index="results/tensors/index.parquet",
        tensors=tensor_shards,
    output:
        model="results/models/{pathology}/model.pt",
        metadata="results/models/{pathology}/metadata.json",
        history="results/models/{pathology}/history.csv",
    log:
        "results/logs/train/{pathology}.log",
    benchmark:
        "results/benchmarks/train/{pathology}.tsv"
    retries: 2
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=360,
    params:
        config=training_settings,
    script:
        "../scripts/train.py"
