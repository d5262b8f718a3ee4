"""What a refresh reports: its kind, per-collection counts, duration, rejections, held deletions.

Flow: ... -> persister -> **RefreshResult** -> refresh_runs, logs, metrics, CLI summary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.model.rejection import Rejection
    from daemon.persistence.deletion_guard import HeldDeletion

from daemon.model.targets import Trigger


class RefreshKind(enum.Enum):
    FULL = "full"
    TARGETED = "targeted"

    @property
    def full(self) -> bool:
        return self is RefreshKind.FULL


@dataclass(frozen=True, slots=True)
class Counts:
    """Rows written by a refresh in one collection."""

    created: int = 0
    updated: int = 0
    archived: int = 0
    deleted: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.created + other.created,
            self.updated + other.updated,
            self.archived + other.archived,
            self.deleted + other.deleted,
        )

    @property
    def written(self) -> int:
        return self.created + self.updated + self.archived + self.deleted

    def __str__(self) -> str:
        return (
            f"created={self.created} updated={self.updated} "
            f"archived={self.archived} deleted={self.deleted}"
        )


@dataclass(slots=True)
class RefreshResult:
    manager: str
    kind: RefreshKind
    targets: int
    counts: dict[str, Counts]
    started_at: datetime
    duration: float
    extra: dict[str, Any] = field(default_factory=dict)
    trigger: Trigger = Trigger.EVENT
    """Why it ran (``refresh_runs.trigger``)."""
    rejected: list[Rejection] = field(default_factory=list)
    """Objects this refresh could not save (kept as they were, retried later)."""
    held_deletion: HeldDeletion | None = None
    """A full refresh's deletions the mass-deletion guard held back (None: applied)."""

    @property
    def total(self) -> Counts:
        total = Counts()
        for c in self.counts.values():
            total = total + c
        return total

    @property
    def rows_written(self) -> int:
        return self.total.written

    def details(self) -> dict[str, dict[str, int]]:
        """Non-zero counts per collection (stored in ``refresh_runs.details``)."""
        return {
            name: {k: v for k, v in vars_of(c).items() if v}
            for name, c in self.counts.items()
            if c.written
        }

    def rejected_counts(self) -> dict[str, int]:
        """Rejected objects per collection."""
        out: dict[str, int] = {}
        for r in self.rejected:
            out[r.collection] = out.get(r.collection, 0) + 1
        return out

    def run_details(self) -> dict[str, dict[str, int]]:
        """``refresh_runs.details``: the counts, plus ``rejected`` (objects per collection)
        and ``held_deletion`` (``rows`` held of ``total``) when there are any."""
        out = self.details()
        if self.rejected:
            out["rejected"] = self.rejected_counts()
        if self.held_deletion is not None:
            out["held_deletion"] = self.held_deletion.as_details()
        return out

    def summary_lines(self) -> list[str]:
        lines = [f"{name:<20} {c}" for name, c in self.counts.items()]
        lines.append(
            f"{self.manager}: {self.kind.value} refresh of {self.targets} target(s) "
            f"in {self.duration:.3f}s, {self.rows_written} row(s) written"
        )
        lines.extend(
            f"rejected {r.collection} {r.ref!r} ({r.reason.value}): {r.error}"
            for r in self.rejected
        )
        if self.held_deletion is not None:
            lines.append(self.held_deletion.message(self.manager))
        return lines


def vars_of(c: Counts) -> dict[str, int]:
    return {
        "created": c.created,
        "updated": c.updated,
        "archived": c.archived,
        "deleted": c.deleted,
    }
