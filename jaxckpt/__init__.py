"""jaxckpt: train JAX/Flax models with checkpointing done right.

Best-K by a monitored metric and latest-N, saved asynchronously through Orbax, with the
optimizer state, RNG and data position, so a crashed or preempted run resumes exactly.
"""

from jaxckpt.errors import CheckpointCorruptError as CheckpointCorruptError
from jaxckpt.errors import CheckpointDirectoryError as CheckpointDirectoryError
from jaxckpt.errors import CheckpointNotFoundError as CheckpointNotFoundError
from jaxckpt.errors import CheckpointWriteError as CheckpointWriteError
from jaxckpt.errors import DirectoryLockedError as DirectoryLockedError
from jaxckpt.errors import MetricError as MetricError
from jaxckpt.errors import RestoreStructureError as RestoreStructureError
from jaxckpt.manager import Checkpoint as Checkpoint
from jaxckpt.manager import CheckpointManager as CheckpointManager
from jaxckpt.resume import restore_or_init as restore_or_init
from jaxckpt.policy import CheckpointPolicy as CheckpointPolicy
from jaxckpt.policy import KeepReason as KeepReason
from jaxckpt.policy import auto_interval as auto_interval
from jaxckpt.policy import metric_mode as metric_mode

__version__ = "0.1.0"
from jaxckpt.history import History as History
from jaxckpt.early_stopping import EarlyStopping as EarlyStopping

# The training loop pulls in grain, tensorflow-datasets and rich, the train state Flax
# and optax: loaded on first use, so that `import jaxckpt` and read-only CLI commands
# stay light (a manager needs only JAX and Orbax).
_LAZY = {
    "TrainState": "jaxckpt.state",
    "nnx_checkpoint_state": "jaxckpt.state",
    "nnx_merge": "jaxckpt.state",
    "nnx_restore_into": "jaxckpt.state",
    "nnx_split": "jaxckpt.state",
    "NonFiniteLossError": "jaxckpt.train",
    "Trainer": "jaxckpt.train",
    "Callback": "jaxckpt.callbacks",
    "CSVLogger": "jaxckpt.loggers",
    "FunctionLogger": "jaxckpt.loggers",
    "TensorBoardLogger": "jaxckpt.loggers",
    "WandbLogger": "jaxckpt.loggers",
}


_SUBMODULES = ("data",)  # jaxckpt.data.load_tfds(...) after a plain `import jaxckpt`


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib
        return importlib.import_module(f"jaxckpt.{name}")
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxckpt' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
