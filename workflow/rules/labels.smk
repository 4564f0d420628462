# How far the free-text labeler reaches into the archive, and sheets for a doctor to check it (free-text sources
# only: rule all asks for these when the notes are labelled by a vocabulary; see label_targets in common.smk).
# Counts go to results/labels/ (shareable); anything holding note text goes to results/private/labels/.


rule label_coverage:
    """Reads identifiers: the notes in the private catalog. Writes counts only to results/labels/coverage.csv;
    the unmatched notes and sentences and the near-miss words (note text) go to results/private/labels/.
    """
    input:
        unpack(label_text_inputs),
    output:
        coverage=report(
            "results/labels/coverage.csv",
            caption="../report/label_coverage.rst",
            category="Labels",
        ),
        unmatched="results/private/labels/unmatched.csv",
        near_misses="results/private/labels/near_misses.csv",
    log:
        "results/logs/label_coverage.log",
    conda:
        "../../envs/data.yaml"
    params:
        settings=coverage_settings(),
    script:
        "../scripts/label_coverage.py"


rule label_audit_sheets:
    """Reads identifiers: the notes in the private catalog. The sheets hold note text (results/private/)."""
    input:
        unpack(label_text_inputs),
    output:
        sheets=expand("results/private/labels/audit/{key}.csv", key=LABEL_KEYS),
    log:
        "results/logs/label_audit_sheets.log",
    conda:
        "../../envs/data.yaml"
    params:
        per_state=config["labels"]["audit_per_key"],
        seed=config["seed"],
    script:
        "../scripts/label_audit.py"


rule label_audit_precision:
    """Reads the doctor's filled audit sheets (note text, under resources/); writes counts and proportions only."""
    input:
        verdicts=audit_verdict_files,
        label_keys=config["labels"]["keys"],
    output:
        precision=report(
            "results/labels/audit_precision.csv",
            caption="../report/label_audit_precision.rst",
            category="Labels",
        ),
    log:
        "results/logs/label_audit_precision.log",
    localrule: True
    conda:
        "../../envs/data.yaml"
    params:
        folder=config["labels"]["audit_verdicts"],
    script:
        "../scripts/label_precision.py"
