"""The edge between Snakemake's `script:` directive and the package: the rule's log, and clean user errors."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

from cxrflow.errors import CxrflowError


@contextmanager
def script(smk):
    """Send everything the job writes to stderr to the rule's log file: cxrflow's logging, warnings, and whatever
    the libraries print, tracebacks included (redirected at the file descriptor, so C extensions and child
    processes too). A CxrflowError becomes one line, in the log and on the console, and exit status 1; any other
    error is logged with its traceback and raised."""
    log_path = smk.log[0] if smk.log else None
    console, saved = sys.stderr, None
    if log_path:
        log_file = open(log_path, "w", encoding="utf-8", buffering=1)
        console.flush()
        saved = os.dup(2)
        os.dup2(log_file.fileno(), 2)
        sys.stderr = log_file
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)], force=True)
    logging.captureWarnings(True)
    try:
        yield logging.getLogger(f"cxrflow.{smk.rule}")
    except CxrflowError as err:
        logging.getLogger("cxrflow").error("%s", err)
        _restore(console, saved)
        print(f"cxrflow error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except BaseException:
        logging.getLogger("cxrflow").exception("rule %s failed", smk.rule)
        raise
    finally:
        _restore(console, saved)


def _restore(console, saved) -> None:
    if saved is None or sys.stderr is console:
        return
    sys.stderr.flush()
    os.dup2(saved, 2)
    sys.stderr = console
