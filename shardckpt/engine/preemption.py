"""Preemption: SIGTERM noted by a handler, then agreed on by every rank at a step boundary.

Saving inside a signal handler could start collectives at different steps on different
ranks, so the handler only notes the signal; the training loop asks at a step boundary
(``Checkpointer.preempted``), and the ranks agree through a small collective on a control
group of their own (sharing the save's group with the background thread could interleave
collectives and hang), so every rank takes its final save after the same step.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class Preemption:
    """The SIGTERM state of one Checkpointer; ``control``: its ranks' control group (None
    without torch.distributed)."""

    def __init__(self, control: dist.ProcessGroup | None) -> None:
        self.control = control
        self.received = False
        self._previous: Any = None  # the SIGTERM handler ours replaced, restored on close

    def install(self) -> None:
        """Note SIGTERM from now on; a Python handler installed before is still called after
        ours, and put back by :meth:`close`. Call from the main thread."""
        if self._previous is not None:
            return  # installed already
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            logger.warning(
                "shardckpt: SIGTERM received: the loop will save and stop at the next check"
            )
            self.received = True
            if callable(previous):  # chain to the handler we replaced (not SIG_DFL / SIG_IGN)
                previous(signum, frame)

        signal.signal(signal.SIGTERM, handler)
        # None: installed from outside Python; the default is what we can restore
        self._previous = signal.SIG_DFL if previous is None else previous

    def agreed(self) -> bool:
        """Whether any rank has received SIGTERM (a collective: every rank must ask)."""
        if self.control is None:
            return self.received
        flag = torch.tensor([int(self.received)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flag.item())

    def close(self) -> None:
        """Put the replaced handler back and free the control group."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self.control is not None:
            dist.destroy_process_group(self.control)
            self.control = None
