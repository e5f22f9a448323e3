"""Checkpoint decisions as pure functions over plain data: no I/O, no JAX.

Three questions, each answered by small frozen rules a test can call directly:

* which direction of a metric is better (:func:`metric_mode`, the one classifier of names)
  and which checkpoint is best (:class:`Objective`: the improvement chain);
* is a save *due* now (:mod:`~jaxckpt.policy.when`: every n steps / epochs / seconds,
  explicit steps, a predicate);
* which checkpoints are kept (:mod:`~jaxckpt.policy.keep`: best-N, latest-N, every n
  steps, one per interval, all), each with a typed :class:`KeepReason`.

:class:`CheckpointPolicy` builds the common combination in one line. The manager feeds it
:class:`Record` s of the checkpoints on disk and does what it says.
"""

from jaxckpt.policy.checkpoint_policy import CheckpointPolicy as CheckpointPolicy
from jaxckpt.policy.checkpoint_policy import MetricError as MetricError
from jaxckpt.policy.checkpoint_policy import auto_interval as auto_interval
from jaxckpt.policy.keep import AnyKeep as AnyKeep
from jaxckpt.policy.keep import BestN as BestN
from jaxckpt.policy.keep import EveryNSeconds as EveryNSeconds
from jaxckpt.policy.keep import EveryNSteps as EveryNSteps
from jaxckpt.policy.keep import KeepAll as KeepAll
from jaxckpt.policy.keep import KeepReason as KeepReason
from jaxckpt.policy.keep import LatestN as LatestN
from jaxckpt.policy.keep import ResumePoint as ResumePoint
from jaxckpt.policy.names import check_mode as check_mode
from jaxckpt.policy.names import metric_mode as metric_mode
from jaxckpt.policy.names import resolve_mode as resolve_mode
from jaxckpt.policy.objective import Objective as Objective
from jaxckpt.policy.objective import Record as Record
from jaxckpt.policy.when import AnySave as AnySave
from jaxckpt.policy.when import EpochInterval as EpochInterval
from jaxckpt.policy.when import Predicate as Predicate
from jaxckpt.policy.when import SaveContext as SaveContext
from jaxckpt.policy.when import SpecificSteps as SpecificSteps
from jaxckpt.policy.when import StepInterval as StepInterval
from jaxckpt.policy.when import TimeInterval as TimeInterval

__all__ = ["CheckpointPolicy", "MetricError", "auto_interval", "Record", "KeepReason",
           "Objective", "metric_mode", "resolve_mode", "check_mode", "SaveContext",
           "StepInterval", "EpochInterval", "TimeInterval", "SpecificSteps", "Predicate",
           "AnySave", "LatestN", "BestN", "EveryNSteps", "EveryNSeconds", "KeepAll",
           "ResumePoint", "AnyKeep"]
