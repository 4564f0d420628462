"""The records every stage of ingest shares: the catalog's and the ledger's columns, what an adapter reports
beside its frame, and what ingest returns. The lowest floor: it imports nothing of ingest, so that adapters
never import the catalog."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cxrflow.errors import CxrflowError
from cxrflow.table_checks import RecordLines

# quality_tag: 1 when the dataset itself tags the image to be left out (a label map's `quality_tags`, e.g.
# PadChest 'exclude', 'suboptimal study'); 0 otherwise, and for sources that have no such tags.
CATALOG_COLUMNS = ["image_id", "patient_id", "sex", "age", "view", "study_date", "path", "text", "quality_tag"]

LEDGER_COLUMNS = ["stage", "source", "item", "reason", "detail"]


@dataclass
class Ingested:
    catalog: pd.DataFrame
    ledger: pd.DataFrame
    summary: dict


@dataclass
class Report:
    """What an adapter tells `build_catalog` beyond the frame: input rows that are not images (so that they
    reach the ledger without counting as images left out), values it could not read, and plain facts. The one
    thing it brings the adapter is how many worker processes it may use."""

    source: str
    ledger: list = field(default_factory=list)
    unrecognized: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    line_numbers: RecordLines | None = None  # the table's record -> file line (frame row i is record i)
    workers: int = 1  # processes an adapter may use (the ingest rule's threads); only the DICOM folder reader does

    def unmatched(self, items, reason: str, detail="") -> None:
        self.ledger.append(ledger_rows(items, reason, detail, source=self.source))


def ledger_rows(items, reason, detail="", stage: str = "ingest", source: str = "") -> pd.DataFrame:
    items = pd.Series(items, dtype="string").reset_index(drop=True)

    def column(value):
        if isinstance(value, (pd.Series, np.ndarray, list)):
            return pd.Series(value, dtype="string").reset_index(drop=True)
        return pd.Series(value, index=items.index, dtype="string")

    return pd.DataFrame({"stage": stage, "source": source, "item": items, "reason": column(reason),
                         "detail": column(detail)}, columns=LEDGER_COLUMNS)


def require_keys(source: dict, names, fmt: str) -> None:
    missing = [n for n in names if not source.get(n)]
    if missing:
        raise CxrflowError(f"source.{missing[0]}: required for source.format {fmt}")
