"""Ingest: one source (a free-text archive, a DICOM folder or a public dataset's tables) -> a catalog of its
images and a ledger of every input row left out. Modules, lowest first: record <- tables, fields <- native <-
freetext, dicom, public (one per adapter family) <- catalog."""

from cxrflow.ingest.catalog import build_catalog
from cxrflow.ingest.tables import read_table

__all__ = ["build_catalog", "read_table"]
