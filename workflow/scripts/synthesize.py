from pathlib import Path

from cxrflow.cli import script
from cxrflow.pipeline import run_synthesize

with script(snakemake):
    run_synthesize(snakemake.params.synthetic, snakemake.params.seed, Path(snakemake.output.annotations).parent)
