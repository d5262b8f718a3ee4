"""The persister's settings: the mass-deletion guard's thresholds and the small-batch limit.

Flow: config ``[persister]`` -> **PersisterSettings** -> persister (deletion guard, small batch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PersisterSettings:
    """Safety settings of the persister."""

    max_delete_ratio: float = 0.5
    """A full refresh that would archive/delete more than this share of the manager's
    rows has its deletions held back (0..1, default 0.5; see daemon.persistence.deletion_guard)."""
    mass_delete_min_rows: int = 10
    """Removing at most this many rows is never held back (default 10)."""
    small_batch_max_targets: int = 1000
    """A targeted refresh of at most this many targets is saved by the small-batch path
    (rows as parameters, no temp tables: daemon/persistence/small_batch.py); larger
    ones by the staged path (COPY into temp tables).  0 sends every refresh to the
    staged path.  Measured
    (bench/RESULTS.md, 2026-12-02, 10k vms): the small-batch path is faster at every
    batch size tried, 1 to 1,000 vms (PostgreSQL 5.6x at 1 vm, 1.9x at 1,000; SQLite
    5.2x and 1.7x); 1,000 is the batcher's default ``full_refresh_threshold``, so larger
    targeted batches (only with a higher threshold) keep the staged path, unmeasured."""
