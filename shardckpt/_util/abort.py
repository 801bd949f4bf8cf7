"""Ctrl-C while a save is in flight: the one place that knows how to stop one.

A save runs on threads of its own while the main thread waits for it (``Checkpointer.wait``,
``close``, leaving its ``with`` block, ``shardckpt.save``). Without this, a Ctrl-C there
printed nothing, the interpreter still waited for every upload (a second Ctrl-C did not
shorten it), and the background save could even commit after it. Now:

- the first Ctrl-C says what happens and lets the save finish, then ``KeyboardInterrupt``
  goes on (exit code 130) with the checkpoint committed;
- the second aborts it: no further object is started, the request bodies in flight stop
  (:func:`shardckpt.store.retry.cancelled_by`), and the manifest is never written after the
  abort (the switch and the commit share a lock). What was uploaded is garbage for gc.

Messages go through ``warnings``, not logging: a training script that configured no logging
still shows them, and library code never prints.
"""

from __future__ import annotations

import sys
import threading
import warnings
from concurrent.futures import Future
from typing import TypeVar

from shardckpt.errors import SaveAbortedError

T = TypeVar("T")


class AbortSwitch:
    """The switch of one save. The waiting thread calls :meth:`abort`; the writer calls
    :meth:`check` before each object it uploads (and hands ``event`` to the store for the
    requests in flight) and :meth:`begin_commit` before its manifest."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._committing = False

    def abort(self) -> bool:
        """Abort the save; False if it is too late (its commit has begun)."""
        with self._lock:
            if self._committing:
                return False
            self.event.set()
            return True

    def check(self, uri: str) -> None:
        if self.event.is_set():
            raise SaveAbortedError(f"{uri}: not uploaded: its save was aborted")

    def begin_commit(self, uri: str) -> None:
        """Called right before the commit: after this, :meth:`abort` refuses."""
        with self._lock:
            if self.event.is_set():
                raise SaveAbortedError(f"{uri}: not committed: its save was aborted")
            self._committing = True


def wait_or_abort(
    future: Future[T], switch: AbortSwitch, what: str, *, interrupted: bool = False
) -> T:
    """The result of ``future``, a save running on other threads; ``what`` names it ("the
    save of step 7 to s3://..."). A Ctrl-C while waiting (or ``interrupted``: one arrived
    before the wait began) lets the save finish, says so and raises ``KeyboardInterrupt``
    once it has (``interrupted``: returns, the caller's goes on); a second Ctrl-C aborts
    it and raises at once."""
    pending: KeyboardInterrupt | None = None
    if not interrupted:
        try:
            return future.result()
        except KeyboardInterrupt as exc:
            if future.done():
                raise
            pending = exc
    try:
        # Said inside the try: a second Ctrl-C right after the message must abort, not escape
        # between the message and the wait (the save would then run on unannounced).
        if not future.done():
            _say(f"Ctrl-C: finishing {what}; press Ctrl-C again to abort it (nothing is committed)")
        result = future.result()
    except KeyboardInterrupt:
        if switch.abort():
            _say(
                f"Ctrl-C: aborted {what}: nothing was committed; what it uploaded is garbage "
                "that `shardckpt gc` removes"
            )
        else:
            _say(f"Ctrl-C: {what} was already committing; it could not be aborted")
        raise
    if pending is not None:
        raise pending
    return result


def _say(message: str) -> None:
    # Point the warning at the caller's code, not at shardckpt's frames.
    frame, level = sys._getframe(0), 1  # stacklevel 1 is this frame
    while frame is not None and frame.f_globals.get("__name__", "").startswith("shardckpt"):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"shardckpt: {message}", stacklevel=level)
