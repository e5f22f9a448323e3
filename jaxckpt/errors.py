"""Errors that name the problem and the fix. Each subclasses the builtin a caller would
expect (ValueError, FileNotFoundError, ...), so ``except ValueError`` keeps working."""

from __future__ import annotations

from jaxckpt.policy import MetricError

__all__ = ["MetricError", "CheckpointNotFoundError", "RestoreStructureError",
           "CheckpointWriteError", "CheckpointDirectoryError", "CheckpointCorruptError",
           "DirectoryLockedError"]


class CheckpointNotFoundError(FileNotFoundError):
    """The requested checkpoint (step, "best" or "latest") does not exist."""


class RestoreStructureError(ValueError):
    """A restore target's tree structure or shapes differ from the checkpoint's."""


class CheckpointWriteError(RuntimeError):
    """A (background) checkpoint write failed; earlier checkpoints are untouched."""


class CheckpointDirectoryError(OSError):
    """The checkpoint directory cannot be used (a file, not writable, not a checkpoint dir)."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files do not match the manifest written when it was committed."""


class DirectoryLockedError(RuntimeError):
    """Another live run is writing to the same checkpoint directory."""


def write_error(what: str, e: BaseException, intact: list[int]) -> CheckpointWriteError:
    if _disk_full(e):
        hint = (" The disk is full: free space (jaxckpt prune DIR deletes what the policy "
                "no longer keeps; keep_latest/keep_best bound what a run keeps) and save "
                "again.")
    elif isinstance(e, OSError):
        hint = " Fix the cause (disk space, permissions) and save again."
    else:
        hint = " Save again; if it keeps failing, report it with this message."
    return CheckpointWriteError(f"{what} failed: {_describe(e)}. Every earlier checkpoint "
                                f"is intact ({intact}).{hint}")


def _disk_full(e: BaseException) -> bool:
    """ENOSPC, raised as OSError by Python or as text by TensorStore ("No space left on
    device [os_error_code='28']"), anywhere in the chain."""
    import errno
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or \
                "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _describe(e: BaseException) -> str:
    """The error with the file it names (``repr`` of an ``OSError`` drops the path)."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{type(e).__name__}: {e}"  # "[Errno 13] Permission denied: '/dir/3/x'"
    return repr(e)
