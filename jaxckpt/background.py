"""One background thread, first in first out, whose errors surface at the next call.

Orbax writes a checkpoint's arrays on its own threads; what jaxckpt does after a commit
(wait for it, write the manifest, delete what it replaced, write the ledger) runs here, in
order, so that files land on disk in the order they were decided.

Tasks may be submitted from one thread while another collects them (the writer's thread
queues the removal of replaced checkpoints on a second ``Background``; the calling thread
collects their errors), so the queue is only touched under a lock.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any, Callable

__all__ = ["Background", "StillRunning"]


class StillRunning(TimeoutError):
    """A background task outlived its deadline; it stays queued and keeps running."""


class Background:
    def __init__(self, name: str = "jaxckpt"):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._futures: collections.deque[concurrent.futures.Future] = collections.deque()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            self._futures.append(self._pool.submit(fn, *args))

    def _first(self, done_only: bool = False) -> concurrent.futures.Future | None:
        with self._lock:
            if not self._futures or (done_only and not self._futures[0].done()):
                return None
            return self._futures[0]

    def _pop(self, future: concurrent.futures.Future) -> concurrent.futures.Future:
        with self._lock:
            if self._futures and self._futures[0] is future:
                self._futures.popleft()
        return future

    def raise_finished(self) -> None:
        """Raise the error of a finished task, without waiting for the others."""
        while (future := self._first(done_only=True)) is not None:
            self._pop(future).result()

    def drain(self, timeout: float | None = None) -> None:
        """Wait for every task; raise the first error (the rest still run to the end).

        Raises:
          StillRunning: a task did not finish within ``timeout`` seconds (it stays queued).
        """
        while (future := self._first()) is not None:
            concurrent.futures.wait([future], timeout=timeout)
            if not future.done():
                raise StillRunning(f"a background task ran for more than {timeout:.0f} s")
            self._pop(future).result()

    def join(self) -> None:
        """Wait for the tasks queued now to finish, leaving their errors to be collected."""
        with self._lock:
            futures = list(self._futures)
        concurrent.futures.wait(futures)

    def settle(self, timeout: float | None = None) -> list[BaseException]:
        """Wait for every task and return (not raise) their errors: after a failure, the
        tasks queued behind it usually fail of the same cause."""
        errors = []
        while (future := self._first()) is not None:
            concurrent.futures.wait([future], timeout=timeout)
            self._pop(future)
            if future.done() and future.exception() is not None:
                errors.append(future.exception())
        return errors

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the thread once its tasks are done; False if they outlast ``timeout``
        seconds (then they are left to run on, or to hang on a stalled store)."""
        with self._lock:
            futures = list(self._futures)
            self._futures.clear()
        running = concurrent.futures.wait(futures, timeout=timeout).not_done
        self._pool.shutdown(wait=not running)
        return not running
