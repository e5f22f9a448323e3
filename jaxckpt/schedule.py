"""``every="auto"``: measure what a save costs and what a step takes, then save every N
steps so that checkpointing stays within the policy's overhead budget.

The decision itself (:func:`jaxckpt.policy.auto_interval`) is pure; this module holds
the measurements, which need a clock. Owned by the calling thread, except
:meth:`AutoInterval.observe_save`, which the background commit calls once per save
(a float assignment: atomic under the GIL).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from jaxckpt.policy import CheckpointPolicy, auto_interval

__all__ = ["AutoInterval"]

log = logging.getLogger("jaxckpt")


class AutoInterval:
    """Step time (an exponential average of the time between ``save`` calls that did not
    write) and save cost (blocking time plus background write time, averaged)."""

    def __init__(self, policy: CheckpointPolicy, *, save_cost_s: float | None = None,
                 every: int | None = None, clock: Callable[[], float] = time.perf_counter):
        self.policy = policy
        self.save_cost_s = save_cost_s
        self.every = every
        self.step_time_s: float | None = None
        self._clock = clock
        self._last_call: tuple[float, int] | None = None
        self._started = False

    @property
    def enabled(self) -> bool:
        return self.policy.every == "auto"

    def observe_call(self, step: int) -> None:
        """Training time per step, from the end of the previous call to this one."""
        now = self._clock()
        if self._last_call is not None and step > self._last_call[1]:
            dt = (now - self._last_call[0]) / (step - self._last_call[1])
            self.step_time_s = dt if self.step_time_s is None else 0.8 * self.step_time_s + 0.2 * dt
        self._last_call = (now, step)

    def observe_saved(self, step: int) -> None:
        """A save just returned: the next step time excludes the save itself."""
        self._started = True
        self._last_call = (self._clock(), step)

    def observe_save(self, blocked_s: float, write_s: float) -> None:
        # A background write overlaps training but competes for the cores: count blocking
        # and write time in full, an upper bound that keeps the budget on any machine.
        cost = blocked_s + write_s
        self.save_cost_s = cost if self.save_cost_s is None else 0.5 * self.save_cost_s + 0.5 * cost

    def due(self, step: int, last_saved: int | None) -> bool:
        """The first call saves (to measure its cost); later calls every N steps."""
        if not self.enabled:
            return False
        if self.save_cost_s is None:
            return not self._started  # one save to measure; none until it committed
        if not self.step_time_s:
            return False
        every = auto_interval(self.save_cost_s, self.step_time_s,
                              overhead_budget=self.policy.overhead_budget,
                              mtbf_hours=self.policy.mtbf_hours)
        if every != self.every:
            log.info("every='auto': saving every %d steps (save cost %.3fs, step %.4fs)",
                     every, self.save_cost_s, self.step_time_s)
            self.every = every
        return step - (last_saved or 0) >= every
