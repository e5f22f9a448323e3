"""One background thread, first in first out, whose errors surface at the next call.

Orbax writes a checkpoint's arrays on its own threads; what jaxckpt does after a commit
(wait for it, write the manifest, delete what it replaced, write the ledger) runs here, in
order, so that files land on disk in the order they were decided.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Callable

__all__ = ["Background", "StillRunning"]


class StillRunning(TimeoutError):
    """A background task outlived its deadline; it stays queued and keeps running."""


class Background:
    def __init__(self, name: str = "jaxckpt"):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._futures: collections.deque[concurrent.futures.Future] = collections.deque()

    @property
    def pending(self) -> int:
        return len(self._futures)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._futures.append(self._pool.submit(fn, *args))

    def raise_finished(self) -> None:
        """Raise the error of a finished task, without waiting for the others."""
        while self._futures and self._futures[0].done():
            self._futures.popleft().result()

    def drain(self, timeout: float | None = None) -> None:
        """Wait for every task; raise the first error (the rest still run to the end).

        Raises:
          StillRunning: a task did not finish within ``timeout`` seconds (it stays queued).
        """
        while self._futures:
            future = self._futures[0]
            concurrent.futures.wait([future], timeout=timeout)
            if not future.done():
                raise StillRunning(f"a background task ran for more than {timeout:.0f} s")
            self._futures.popleft().result()

    def settle(self, timeout: float | None = None) -> list[BaseException]:
        """Wait for every task and return (not raise) their errors: after a failure, the
        tasks queued behind it usually fail of the same cause."""
        errors = []
        while self._futures:
            future = self._futures.popleft()
            concurrent.futures.wait([future], timeout=timeout)
            if future.done() and future.exception() is not None:
                errors.append(future.exception())
        return errors

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the thread once its tasks are done; False if they outlast ``timeout``
        seconds (then they are left to run on, or to hang on a stalled store)."""
        running = concurrent.futures.wait(self._futures, timeout=timeout).not_done
        self._futures.clear()
        self._pool.shutdown(wait=not running)
        return not running
