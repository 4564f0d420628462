from cxrflow.cli import script
from cxrflow.pipeline import run_cohort_flows

with script(snakemake):
    run_cohort_flows(snakemake.input.flows, snakemake.output.summary, snakemake.output.figure)
