"""The output store: the commit protocol (parts, compaction, uploads), the run's state files, atomic writes.

checkpoint.py  OutputStore: commit parts, scan progress, compact shards, quarantine torn parts
compaction.py  streaming compaction of a shard's parts into its final file
state.py       `_batchrun/` state files and the run fingerprint (StateStore, OutputStore's base)
uploads.py     aborting the multipart uploads that killed writers left
tables.py      rows -> Arrow, schema unification, Parquet/JSONL files
atomic.py      writes that are visible only when complete, on any filesystem
"""

from runner.store.checkpoint import OutputStore, ShardProgress
from runner.store.state import STATE_DIR, CheckpointError, FingerprintMismatch, StateStore

__all__ = [
    "STATE_DIR",
    "CheckpointError",
    "FingerprintMismatch",
    "OutputStore",
    "ShardProgress",
    "StateStore",
]
