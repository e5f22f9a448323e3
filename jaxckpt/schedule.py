"""``every="auto"``: measure what a save costs and what a step takes, then save every N
steps so that checkpointing stays within the policy's overhead budget.

The decision itself (:func:`jaxckpt.policy.auto_interval`) is pure; this module holds
the measurements, which need a clock. Owned by the calling thread, except
:meth:`AutoInterval.observe_save`, which the background commit calls once per save
(one assignment, atomic under the GIL).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, NamedTuple

from jaxckpt.policy import CheckpointPolicy, auto_interval

__all__ = ["AutoInterval"]

log = logging.getLogger("jaxckpt")


class _Window(NamedTuple):
    """A save being measured: from the call that saved to the first call after its commit."""

    start: float  # clock at the start of the saving call
    step: int
    blocked: float  # how long that call took: a cost measured directly, not estimated


class AutoInterval:
    """Step time and save cost, both measured on the training loop's own clock.

    The step time is an average of the time per step between ``save`` calls while no write
    is in flight. A save's cost is what it took from the loop, blocking and
    slowdown together: the time from the call that saved to the first call after its write
    committed, less the steps in between at the step time. The write's own duration is not
    an upper bound of that: on a host whose cores the write shares, the loop loses more
    (the step after a save copies the state the write still reads, the kernel copies into
    the page cache on the loop's cores). Counting blocking plus write time, a 32 MiB state
    on 2 cores spent 7-17 % of its time saving against a 5 % budget (bench/README.md).
    """

    def __init__(self, policy: CheckpointPolicy, *, save_cost_s: float | None = None,
                 every: int | None = None, clock: Callable[[], float] = time.perf_counter,
                 announce: bool = True):
        self.policy = policy
        self.save_cost_s = save_cost_s
        self.every = every
        self.step_time_s: float | None = None
        self._steps_timed = 0
        self.committed: int | None = None  # the latest step committed (observe_save)
        self._clock = clock
        self._call: tuple[float, int] | None = None  # the latest call: (its start, step)
        self._window: _Window | None = None
        self._unpriced: tuple | None = None  # _price's arguments, awaiting a step time
        self._started = False
        self._announce = announce  # log a new interval (process 0's is the one used)

    @property
    def enabled(self) -> bool:
        return self.policy.every == "auto"

    def observe_call(self, step: int) -> None:
        """A ``save`` call at ``step`` (before it decides): closes a measured window whose
        write has committed, else adds the time since the previous call to the step time
        when no write was in flight."""
        now = self._clock()
        if self._window is not None:
            if self._committed(self._window):
                self._close(now, step)
        elif self._call is not None and step > self._call[1]:
            dt = (now - self._call[0]) / (step - self._call[1])
            self._steps_timed += 1
            # The mean of the first 20, then a slow average: a save's cost is its window
            # less N step times, so one slow step (a collection, a log line) in a fast
            # average moved the estimated cost by N times its excess.
            weight = max(1.0 / self._steps_timed, 0.05)
            self.step_time_s = dt if self.step_time_s is None else \
                (1 - weight) * self.step_time_s + weight * dt
            if self._unpriced is not None:
                self._price(*self._unpriced)
        self._call = (now, step)

    def observe_saved(self, step: int) -> None:
        """The call at ``step`` wrote a checkpoint: its window opens at the call's start.

        Orbax writes one checkpoint at a time, so a save waits for the write before it:
        that window closes here, its cost including the wait.
        """
        self._started = True
        now = self._clock()
        start = self._call[0] if self._call is not None and self._call[1] == step else now
        if self._window is not None and self._committed(self._window):
            self._close(now, step)
            start = now  # the wait is the previous save's, counted once
        self._window = _Window(start, step, now - start)

    def observe_save(self, step: int, blocked_s: float, write_s: float) -> None:
        """Background: ``step`` committed (``blocked_s`` and ``write_s`` are only logged:
        its cost to the loop is measured on the loop's clock)."""
        log.debug("step %d committed: blocked %.4fs, written in %.3fs", step, blocked_s,
                  write_s)
        self.committed = step

    def write_failed(self) -> None:
        """The write in flight failed (reported to the caller): no window to price, and no
        write for the next save to wait for (its window would otherwise stay open, and
        no save would ever be due again)."""
        self._window = None

    def _committed(self, window: _Window) -> bool:
        done = self.committed
        return done is not None and done >= window.step

    def _close(self, now: float, step: int) -> None:
        window, self._window = self._window, None
        self._price(now - window.start, step - window.step, window.blocked)

    def _price(self, seconds: float, steps: int, blocked: float) -> None:
        """A save's cost from a window of ``seconds`` holding ``steps`` training steps, at
        least the time its call blocked (the rest is the difference of two large numbers:
        a cheap save in a long window can come out at 0, which would make every step due)."""
        if self.step_time_s is None:  # the first save comes before any step time
            self._unpriced = (seconds, steps, blocked)
            return
        self._unpriced = None
        cost = max(blocked, seconds - steps * self.step_time_s)
        self.save_cost_s = cost if self.save_cost_s is None else 0.5 * self.save_cost_s + 0.5 * cost

    def due(self, step: int, last_saved: int | None) -> bool:
        """The first call saves (to measure its cost); later calls every N steps, and never
        while the previous save's write is in flight (a save that costs the loop nothing
        would otherwise come at every step, each waiting for the one before)."""
        if not self.enabled:
            return False
        if self.save_cost_s is None:
            return not self._started  # one save to measure; none until it is priced
        if not self.step_time_s or self._window is not None:
            return False  # a write in flight: the next save would wait for it
        every = auto_interval(self.save_cost_s, self.step_time_s,
                              overhead_budget=self.policy.overhead_budget,
                              mtbf_hours=self.policy.mtbf_hours)
        if every != self.every and self._announce:
            log.info("every='auto': saving every %d steps (save cost %.3fs, step %.4fs)",
                     every, self.save_cost_s, self.step_time_s)
        self.every = every
        return step - (last_saved or 0) >= every
