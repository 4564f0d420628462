# The trained models applied to a folder of new images (config predict.images), e.g.
#   snakemake --cores all predict --config predict='{images: path/to/folder}'
rule predict:
    input:
        images=config["predict"]["images"],
        models=expand("results/models/{pathology}/model.pt", pathology=PATHOLOGIES),
        metadata=expand("results/models/{pathology}/metadata.json", pathology=PATHOLOGIES),
        metrics=expand("results/metrics/{pathology}.json", pathology=PATHOLOGIES),
    output:
        # Rows name the user's files, whose names may name patients: a private output.
        probabilities="results/private/predictions/probabilities.csv",
    log:
        "results/logs/predict.log",
    retries: 2
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        pathologies=PATHOLOGIES,
        quality=quality_rules(),
    script:
        "../scripts/predict.py"
