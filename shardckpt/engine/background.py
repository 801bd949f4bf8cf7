"""The background of a save: one thread, one save in flight, its failure raised once.

The :class:`~shardckpt.Checkpointer` and the Lightning plugin both return from a save once
the snapshot is taken and leave upload and commit to a thread of their own. What that takes
lives here, once: jobs run in order on one thread (so the collectives of consecutive saves
never interleave); the error of a background save is kept and raised by the next call that
waits or saves, once; a job queued behind a save (a Lightning removal) runs only if that save
committed; Ctrl-C while waiting lets the save finish and a second one aborts it
(``shardckpt._util.abort``), and whatever the abort made fail is one ``SaveAbortedError``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from shardckpt._util.abort import AbortSwitch, wait_or_abort
from shardckpt.engine.stats import SaveStats
from shardckpt.errors import SaveAbortedError


class Job:
    """One task of a :class:`SaveQueue`: a save of ``uri`` (``saves``, with the ``switch``
    that aborts it) or a task queued behind one. ``what`` names it in messages ("the save of
    step 7 to s3://...")."""

    def __init__(
        self, future: Future[None], switch: AbortSwitch, what: str, uri: str, *, saves: bool
    ) -> None:
        self.future = future
        self.switch = switch
        self.what = what
        self.uri = uri
        self.saves = saves
        self.raised = False  # its error reached the caller already

    def done(self) -> bool:
        return self.future.done()

    def wait(self, *, interrupted: bool = False) -> None:
        """Block until done and raise its error. ``interrupted``: a Ctrl-C arrived before the
        wait began (see ``wait_or_abort``)."""
        try:
            wait_or_abort(self.future, self.switch, self.what, interrupted=interrupted)
        except KeyboardInterrupt:
            raise  # not the job's error: it is still to be raised, or was aborted
        except BaseException:
            self.raised = True
            raise


class SaveHandle:
    """The handle ``save`` returns: ``wait()`` blocks until committed (raising its error),
    ``done()`` tells whether it has finished. Ctrl-C while waiting: see ``shardckpt._util.abort``
    (the first lets the save finish, the second aborts it)."""

    def __init__(self, step: int, job: Job | None, stats: SaveStats) -> None:
        self.step = step
        self.stats = stats
        self._job = job

    @property
    def skipped(self) -> bool:
        return self._job is None

    def done(self) -> bool:
        return self._job is None or self._job.done()

    def wait(self) -> None:
        if self._job is not None:
            self._job.wait()


class SaveQueue:
    """One background thread (started on first use, named ``thread_name``) running jobs in
    order. ``last`` is the newest job: a job queued behind a failed one fails with its error
    instead of running, so ``last`` carries the first failure."""

    def __init__(self, thread_name: str) -> None:
        self._thread_name = thread_name
        self._executor: ThreadPoolExecutor | None = None
        self.last: Job | None = None
        self._jobs: list[Job] = []  # queued or running, oldest first (pruned as they finish)

    def submit(self, save: Callable[[AbortSwitch], None], what: str, uri: str) -> Job:
        """Queue ``save(switch)``, a save of ``uri`` that ``switch`` aborts."""
        switch = AbortSwitch()

        def run() -> None:
            try:
                save(switch)
            except BaseException as exc:
                if switch.event.is_set():  # whatever the abort made fail, DCP's wrapping included
                    raise SaveAbortedError(
                        f"{what} was aborted (Ctrl-C): nothing was committed; gc removes what it uploaded"
                    ) from exc
                raise

        return self._queue(Job(self._start(run), switch, what, uri, saves=True))

    def then(self, task: Callable[[], None], what: str, uri: str) -> Job:
        """Queue ``task`` (about ``uri``) behind the newest job: it runs only if that one
        succeeded, and otherwise fails with its error. Waiting for it, a second Ctrl-C
        aborts the save before it (if that has not finished)."""
        before = self.last

        def run() -> None:
            if before is not None:
                before.future.result()  # finished: the thread runs jobs in order
            task()

        switch = before.switch if before is not None else AbortSwitch()
        return self._queue(Job(self._start(run), switch, what, uri, saves=False))

    def _start(self, run: Callable[[], None]) -> Future[None]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._thread_name)
        return self._executor.submit(run)

    def _queue(self, job: Job) -> Job:
        self._jobs = [j for j in self._jobs if not j.done()] + [job]
        self.last = job
        return job

    def busy(self) -> bool:
        return self.last is not None and not self.last.done()

    def in_flight(self, uri: str) -> Job | None:
        """The newest job about ``uri`` that has not finished, if any."""
        return next((j for j in reversed(self._jobs) if j.uri == uri and not j.done()), None)

    def raise_error(self) -> None:
        """Raise the error of the newest job if it has finished and failed, once."""
        if self.last is not None and self.last.done():
            self.wait()

    def wait(self, *, interrupted: bool = False) -> None:
        """Block until every job has finished; raise the first failure, once (not again if
        the caller already got it from the save's own handle)."""
        if self.last is not None:
            last, self.last = self.last, None
            if not last.raised:
                last.wait(interrupted=interrupted)

    def close(self) -> None:
        """Let the jobs finish and stop the thread; a later job starts a new one."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
