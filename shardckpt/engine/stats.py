"""The figures of one save or load on one rank, handed to ``on_stats`` and logged as JSON.

Plain dataclasses, apart from the Checkpointer, so the background machinery (which hands a
save's figures back through its :class:`~shardckpt.engine.background.SaveHandle`) and users
can import them without it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SaveStats:
    """Figures of one save on this rank. Seconds: ``blocked_s`` (the training step was
    blocked), ``snapshot_s`` (until the host copy was complete; equals ``blocked_s`` unless
    overlapping), ``upload_s`` (upload and commit), ``total_s`` (save call to committed).
    ``bytes`` and ``objects`` this rank wrote; ``reused_bytes`` of them an incremental save
    did not upload (an earlier checkpoint holds them); ``requests``, ``retries`` and
    ``throttled`` (503 SlowDown replies) this save cost the store, retention included."""

    step: int
    rank: int
    blocked_s: float
    bytes: int
    snapshot_s: float = 0.0
    upload_s: float = 0.0
    total_s: float = 0.0
    objects: int = 0
    reused_bytes: int = 0
    requests: int = 0
    retries: int = 0
    throttled: int = 0

    @property
    def snapshot_gbps(self) -> float:
        return self.bytes / self.snapshot_s / 1e9 if self.snapshot_s else 0.0

    @property
    def upload_gbps(self) -> float:
        return self.bytes / self.upload_s / 1e9 if self.upload_s else 0.0


@dataclass
class LoadStats:
    """Figures of one load on this rank: seconds, bytes read, store requests and retries."""

    step: int
    rank: int
    seconds: float
    bytes: int
    requests: int
    retries: int
    throttled: int

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0
