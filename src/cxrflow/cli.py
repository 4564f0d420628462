"""The edge between Snakemake's `script:` directive and the package: logging, and clean user errors."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

from cxrflow.errors import CxrflowError


@contextmanager
def script(smk):
    """Send logging to the rule's log file; turn a CxrflowError into one line on stderr and exit status 1."""
    log_path = smk.log[0] if smk.log else None
    handlers = [logging.FileHandler(log_path, mode="w", encoding="utf-8") if log_path else logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True)
    try:
        yield logging.getLogger(f"cxrflow.{smk.rule}")
    except CxrflowError as err:
        logging.getLogger("cxrflow").error("%s", err)
        print(f"cxrflow error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
