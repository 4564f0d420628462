# The trained models applied to a folder of new images (config predict.images), e.g.
#   snakemake --cores all predict --config predict='{images: path/to/folder}'
rule predict:
    # Model folders only (weights, input convention, threshold): no metrics, no cache, no cohort.
    input:
        unpack(prediction_models),
        images=config["predict"]["images"],
    output:
        # Rows name the user's files, whose names may name patients: a private output.
        probabilities="results/private/predictions/probabilities.csv",
    log:
        "results/logs/predict.log",
    retries: 2
    conda:
        "../../envs/train.yaml"
    # Files stream through in batches: the memory is the models and one batch, whatever the folder's size.
    threads: 2
    resources:
        gpu=1,
        mem_mb=4000,
        runtime=60,
    params:
        pathologies=PATHOLOGIES,
        quality=quality_rules(),
    script:
        "../scripts/predict.py"
