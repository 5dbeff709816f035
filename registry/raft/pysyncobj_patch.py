"""The one patch of a pysyncobj module global: its journal factory, so a node can hand it our ``RaftLog``.

pysyncobj 0.3.17 builds its journal in ``SyncObj.__init__`` with
``createJournal(conf.journalFile)``, a name ``pysyncobj.syncobj`` imported
from ``pysyncobj.journal``, and uses ``conf.journalFile`` nowhere else.  After
``install()``, a ``journalFile`` that is already a journal object (our
``RaftLog``) is used as it is; a path or None still gets pysyncobj's own.
"""

from __future__ import annotations

from typing import Any

import pysyncobj.syncobj as _syncobj
from pysyncobj.journal import createJournal as _pysyncobj_create_journal
from pysyncobj.version import VERSION

from registry.raft.log import RaftLog

__all__ = ["install", "PATCHED_VERSION"]

#: The pysyncobj this patch was written against; another may build its journal elsewhere.
PATCHED_VERSION = "0.3.17"


def _create_journal(journal_file: Any = None) -> Any:
    if isinstance(journal_file, RaftLog):
        return journal_file
    return _pysyncobj_create_journal(journal_file)


def install() -> None:
    """Route pysyncobj's journal factory through ``_create_journal`` (idempotent)."""
    assert VERSION == PATCHED_VERSION, f"pysyncobj {VERSION}: the journal patch was written for {PATCHED_VERSION}"
    _syncobj.createJournal = _create_journal
