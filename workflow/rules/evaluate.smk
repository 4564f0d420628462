rule evaluate:
    input:
        unpack(trained_model),
        manifest="results/splits/{pathology}.csv",
        catalog="results/catalog.parquet",
        index="results/tensors/index.parquet",
        tensors=tensor_shards,
    output:
        metrics="results/metrics/{pathology}.json",
        predictions="results/predictions/{pathology}.csv",
        # The model folder describes itself: the decision threshold and the label definition sit beside the
        # weights, so that predict needs nothing but model folders.
        threshold="results/models/{pathology}/threshold.json",
        label="results/models/{pathology}/label.json",
        subgroups=report(
            "results/subgroups/{pathology}.csv",
            caption="../report/subgroups.rst",
            category="Evaluation",
            subcategory="{pathology}",
        ),
        reliability=report(
            "results/figures/{pathology}_reliability.png",
            caption="../report/reliability.rst",
            category="Evaluation",
            subcategory="{pathology}",
        ),
        roc=report(
            "results/figures/{pathology}_roc.png",
            caption="../report/roc.rst",
            category="Evaluation",
            subcategory="{pathology}",
        ),
        confusion=report(
            "results/figures/{pathology}_confusion.png",
            caption="../report/confusion.rst",
            category="Evaluation",
            subcategory="{pathology}",
        ),
        curves=report(
            "results/figures/{pathology}_training.png",
            caption="../report/training.rst",
            category="Evaluation",
            subcategory="{pathology}",
        ),
        # Overlays on patients' images: shareable only for the synthetic archive or with report.show_images: true.
        gradcam=(
            report(
                "results/figures/{pathology}_gradcam.png",
                caption="../report/gradcam.rst",
                category="Evaluation",
                subcategory="{pathology}",
            )
            if SHOW_IMAGES
            else "results/private/figures/{pathology}_gradcam.png"
        ),
    log:
        "results/logs/evaluate/{pathology}.log",
    benchmark:
        "results/benchmarks/evaluate/{pathology}.tsv"
    retries: 2
    conda:
        "../../envs/train.yaml"
    # On a GPU when training gets one (train.smk); predicting streams batches from the memory-mapped cache, so the
    # memory is the model and a few batches whatever the cohort's size.
    threads: 2
    resources:
        gpu=1,
        mem_mb=4000,
        runtime=60,
    params:
        config=evaluation_settings,
    script:
        "../scripts/evaluate.py"


# The model card beside the weights: what the model is for, how its labels were made, how it was tested.
rule model_card:
    input:
        metadata=model_metadata,
        threshold="results/models/{pathology}/threshold.json",
        metrics="results/metrics/{pathology}.json",
        flow="results/cohorts/{pathology}_flow.csv",
        manifest="results/splits/{pathology}.csv",
    output:
        card=report(
            "results/models/{pathology}/model_card.md",
            caption="../report/model_card.rst",
            category="Model cards",
            subcategory="{pathology}",
        ),
        json="results/models/{pathology}/model_card.json",
    log:
        "results/logs/model_card/{pathology}.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        config=model_card_settings,
    script:
        "../scripts/model_card.py"
