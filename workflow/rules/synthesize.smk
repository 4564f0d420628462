rule synthesize:
    output:
        annotations="resources/synthetic/annotations.csv",
        truth="resources/synthetic/truth.csv",
        images=directory("resources/synthetic/images"),
    log:
        "results/logs/synthesize.log",
    conda:
        "../../envs/data.yaml"
    params:
        synthetic=config["synthetic"],
        seed=config["seed"],
    script:
        "../scripts/synthesize.py"
