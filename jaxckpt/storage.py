"""Files, local or ``gs://``: the one place that knows the difference.

Everything jaxckpt itself writes, moves, lists or deletes goes through here (Orbax writes
the checkpoints). Every call has a deadline: a store that stops answering raises
:class:`StorageTimeoutError` naming the operation and the path, instead of hanging the
run. A timed-out call keeps running in a daemon thread; nothing it was doing is undone.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any, Callable, Iterator, TypeVar

from etils import epath

from jaxckpt import format as fmt

__all__ = ["is_remote", "as_path", "call", "atomic_write_text", "read_text", "move_tree",
           "check_writable", "occupant", "walk_files", "list_names", "remove_tree",
           "set_aside", "remove_set_aside", "finish_deletions", "forget_cached_listings",
           "StorageTimeoutError", "DEFAULT_TIMEOUT_S"]

log = logging.getLogger("jaxckpt")
T = TypeVar("T")

DEFAULT_TIMEOUT_S = 300.0
"""Deadline of one storage call; a healthy store answers each in well under a second."""


class StorageTimeoutError(TimeoutError):
    """A storage call did not return before its deadline (a stalled store)."""

    operation: str = ""
    """What did not finish, as ``"deleting gs://bucket/run/3"``."""
    timeout_s: float | None = None


def is_remote(path: Any) -> bool:
    """Whether ``path`` names an object store (``gs://``, ``s3://``) rather than a disk."""
    return "://" in str(path)


def as_path(directory: str | os.PathLike) -> epath.Path:
    """An ``epath.Path``; local paths made absolute (Orbax requires that)."""
    text = os.fspath(directory)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def call(fn: Callable[..., T], *args: Any, what: str, path: Any,
         timeout: float | None = DEFAULT_TIMEOUT_S) -> T:
    """``fn(*args)``, raising :class:`StorageTimeoutError` past ``timeout`` seconds.

    Local calls run inline (a local disk that hangs is beyond repair by a deadline). Calls
    on an object store run in a daemon thread, so that neither the caller nor the
    interpreter's exit waits for a store that stopped answering.
    """
    if timeout is None or not is_remote(path):
        return fn(*args)
    result: list[Any] = []
    error: list[BaseException] = []

    def run():
        try:
            result.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            error.append(e)
    worker = threading.Thread(target=run, name="jaxckpt-io", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        stalled = StorageTimeoutError(
            f"{what} {path} did not finish within {timeout:.0f} s: the store stopped "
            "answering. Nothing saved was lost; check the store (or the network) and "
            "save again, or raise CheckpointManager(storage_timeout_s=...).")
        stalled.operation, stalled.timeout_s = f"{what} {path}", timeout
        raise stalled
    if error:
        raise error[0]
    return result[0]


def read_text(path: epath.Path, *, timeout: float | None = DEFAULT_TIMEOUT_S) -> str:
    return call(path.read_text, what="reading", path=path, timeout=timeout)


def atomic_write_text(path: epath.Path, text: str, *,
                      timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
    """Write ``text`` so that a reader sees the old file or the new one, never a part."""
    def write():
        if is_remote(path):  # an object appears whole or not at all; stores have no rename
            fs, key = _fsspec(path)
            fs.pipe_file(key, text.encode())  # one request: a simple upload
            forget_cached_listings(path)
            return
        tmp = path.parent / fmt.temp_name(path.name)
        try:
            tmp.write_text(text)
            tmp.replace(path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    call(write, what="writing", path=path, timeout=timeout)


def walk_files(root: epath.Path, _prefix: str = "") -> Iterator[tuple[str, int]]:
    """``(relative POSIX path, size)`` of every file under ``root``, local or ``gs://``.

    Not ``epath.Path.walk``: on ``gs://`` it yields directories without their ``gs://``
    prefix, which then name local paths.
    """
    if not is_remote(root):
        yield from _walk_local(str(root), _prefix)
        return
    # One flat listing (no delimiter): a request per 1,000 objects, not one per directory.
    fs, key = _fsspec(root)
    base = key + "/"
    for name, info in fs.find(key, detail=True).items():
        if name.startswith(base) and info.get("type") != "directory":
            yield _prefix + name[len(base):], int(info["size"])


def _walk_local(base: str, prefix: str) -> Iterator[tuple[str, int]]:
    """``os.walk``'s files (symlinked directories not entered; a symlinked file by its
    target's size) from one ``scandir`` per directory, with no path arithmetic per file:
    a restore lists its step first, so this is on its critical path."""
    stack = [(base, prefix)]
    while stack:
        path, rel = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir():
                    if not entry.is_symlink():
                        stack.append((entry.path, f"{rel}{entry.name}/"))
                    continue
                yield rel + entry.name, entry.stat().st_size


def list_names(directory: epath.Path, *, timeout: float | None = DEFAULT_TIMEOUT_S
               ) -> list[str]:
    """Names in ``directory`` now; empty when it does not exist."""
    def names():
        if not is_remote(directory):
            try:
                return os.listdir(directory)
            except FileNotFoundError:
                return []
        forget_cached_listings(directory)
        if not directory.exists():
            return []
        return [p.name for p in directory.iterdir()]
    return call(names, what="listing", path=directory, timeout=timeout)


def move_tree(src: epath.Path, dest: epath.Path, *,
              timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
    """``src.rename(dest)``. Object stores have no rename: copy each object, then delete."""
    def move():
        if not is_remote(src):
            os.rename(src, dest)
            return
        for rel, _ in walk_files(src):
            (src / rel).copy(dest / rel)
        src.rmtree()
    call(move, what="moving", path=src, timeout=timeout)


def remove_tree(directory: epath.Path, step: int, *,
                timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
    """Delete checkpoint ``step``: rename it to a name every reader ignores, then remove.

    A reader sees the whole checkpoint or none of it; a writer killed in between leaves
    a ``.jaxckpt-deleting-*`` directory that :func:`finish_deletions` removes later.
    """
    aside = set_aside(directory, step, timeout=timeout)
    if aside is not None:
        remove_set_aside(aside)


def set_aside(directory: epath.Path, step: int, *,
              timeout: float | None = DEFAULT_TIMEOUT_S) -> str | None:
    """The part of :func:`remove_tree` readers see: afterwards no reader finds ``step``.

    On a local disk, a rename to a ``.jaxckpt-deleting-*`` name; returns that path, whose
    files :func:`remove_set_aside` then removes (freeing the space can take longer than
    writing the checkpoint did: a 512 MiB file's ``unlink`` took 0.1-0.5 s here, mostly
    waiting on the file system's journal). On a store, the whole deletion (it has no
    rename); None, as when nothing is left to remove.
    """
    src = directory / str(step)
    if is_remote(directory):  # no rename: remove the commit marker first, then the rest
        def remove():
            fs, key = _fsspec(src)
            files = sorted(fs.find(key))  # objects only: no request per pseudo-directory
            marker = f"{key}/{fmt.COMMIT_MARKER}"
            if marker in files:
                fs.rm_file(marker)  # from here on, readers see an unfinished step
                files.remove(marker)
            if files:
                fs.rm(files)
            forget_cached_listings(src)
        call(remove, what="deleting", path=src, timeout=timeout)
        return None
    aside = os.path.join(directory, fmt.deleting_name(step))
    try:
        os.rename(src, aside)
    except FileNotFoundError:
        return None
    if os.path.islink(aside):  # a step someone linked in: the link goes, never its target
        os.unlink(aside)
        return None
    return aside


def remove_set_aside(aside: str) -> None:
    """Remove a checkpoint :func:`set_aside` renamed (local disks)."""
    _rmtree_local(aside)


def finish_deletions(directory: epath.Path) -> None:
    """Remove what a killed writer left behind: interrupted deletions, Orbax's temporary
    step directories, jaxckpt's temporary files (local disks; Orbax cleans stores)."""
    if is_remote(directory):
        return
    for name in list_names(directory):
        # The writer holds the lock, so no other run's checkpoint is in flight here.
        if fmt.is_deleting(name) or fmt.is_leftover(name) or fmt.is_orbax_temp(name):
            path = os.path.join(directory, name)
            log.debug("removing %s, left by an interrupted writer", path)
            if os.path.isdir(path) and not os.path.islink(path):
                _rmtree_local(path)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


def _rmtree_local(path: Any) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=False, onerror=_ignore_missing)


def _ignore_missing(func, path, exc_info) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def _fsspec(path: epath.Path) -> tuple[Any, str]:
    """The fsspec file system etils epath reads ``path`` (an object store URL) through,
    and the path as that file system names it (``bucket/run/3``)."""
    from etils.epath import backend
    fs = backend.fsspec_backend.fs(str(path))
    return fs, fs._strip_protocol(str(path)).rstrip("/")


def forget_cached_listings(path: epath.Path) -> None:
    """Forget this process's cached object listings at, above and below ``path``.

    etils epath reads ``gs://`` through gcsfs, which caches every directory listing and
    answers ``exists``/``stat``/``iterdir`` from it. Another process's writes (or Orbax's,
    through tensorstore) do not update that cache. A no-op for local paths.
    """
    if not is_remote(path):
        return
    try:
        fs, key = _fsspec(path)
        cache = fs.dircache
    except Exception:  # noqa: BLE001 - another fsspec backend, or no listing cache
        return
    fs.invalidate_cache(str(path))
    for cached in list(cache):
        if cached.startswith(key + "/"):
            cache.pop(cached, None)


def check_directory(path: epath.Path, *, read_only: bool,
                    timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
    """Raise :class:`~jaxckpt.CheckpointDirectoryError` (naming the fix) unless ``path``
    can be used: an existing directory to read, or a writable (creatable) one to write."""
    from jaxckpt.errors import CheckpointDirectoryError
    s = str(path)

    def look():
        forget_cached_listings(path)
        return path.exists()
    exists = call(look, what="looking up", path=path, timeout=timeout)
    if exists and not call(path.is_dir, what="looking up", path=path, timeout=timeout):
        raise CheckpointDirectoryError(
            f"checkpoint directory {s} is a file. Pass a directory path (it is created if "
            "missing), or move the file away.")
    if read_only:
        if not exists:
            raise CheckpointDirectoryError(f"checkpoint directory {s} does not exist.")
        return
    if is_remote(path):  # object stores have no permissions to probe cheaply
        bucket = epath.Path("/".join(s.split("/", 3)[:3]))  # gs://bucket
        if not exists and not call(bucket.exists, what="looking up", path=bucket,
                                   timeout=timeout):
            raise CheckpointDirectoryError(
                f"bucket {bucket} of checkpoint directory {s} does not exist, or these "
                f"credentials cannot see it. Create it (gcloud storage buckets create "
                f"{bucket}), fix the URL, or give this machine's account access to it.")
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / fmt.temp_name("jaxckpt-probe")
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CheckpointDirectoryError(
            f"checkpoint directory {s} is not writable ({e.strerror or e}). Choose a "
            "directory you can write to, or fix its permissions; to read its checkpoints "
            "only, open it with CheckpointManager(..., read_only=True).") from e


def check_writable(directory: epath.Path) -> None:
    """Raise the ``OSError`` a new step directory in local ``directory`` would meet (gone,
    read-only, permission denied, no space or inodes left), from metadata alone.

    Orbax makes the step directory in the background, and when that fails its writer waits
    300 s for it (the interpreter's exit with it); this turns the common causes into an
    error on the calling thread, in microseconds. Not a mkdir/rmdir probe: on ext4 those
    wait for the journal, and beside a checkpoint's writeback that blocked ``save()`` for
    up to 340 ms (p99 320 ms, against 0.3 ms idle). A cause these checks miss (a quota, an
    I/O error) is still reported by the background write.
    """
    path = os.fspath(directory)
    fs = os.statvfs(path)  # FileNotFoundError once the directory is gone

    def fail(code: int) -> OSError:
        return OSError(code, os.strerror(code), path)

    if not os.path.isdir(path):
        raise fail(errno.ENOTDIR)
    if fs.f_flag & os.ST_RDONLY:
        raise fail(errno.EROFS)
    # The effective ids and capabilities, as mkdir is checked (root without
    # CAP_DAC_OVERRIDE is refused a read-only directory).
    if not os.access(path, os.W_OK | os.X_OK,
                     effective_ids=os.access in os.supports_effective_ids):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    free_blocks = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail  # root may use the reserve
    if free_blocks == 0 or (fs.f_files > 0 and fs.f_ffree == 0):  # f_files 0: no inode count
        raise fail(errno.ENOSPC)


def occupant(path: epath.Path, *, timeout: float | None = DEFAULT_TIMEOUT_S) -> str | None:
    """What is at ``path``, in words ("a file", "an empty directory", ...), or None when
    nothing is (a dangling link counts: a directory cannot be made there).

    On a store, one lookup (gcsfs asks for the object and lists the prefix at once):
    Orbax's save deletes whatever is at a step name there before writing, silently.
    """
    if is_remote(path):
        def look():
            forget_cached_listings(path)  # another client's object is not in this cache
            fs, key = _fsspec(path)
            try:
                info = fs.info(key)
            except FileNotFoundError:
                return None
            return "objects that are not a checkpoint of this run" \
                if info.get("type") == "directory" else "an object (a file)"
        return call(look, what="looking up", path=path, timeout=timeout)
    local = os.fspath(path)
    if not os.path.lexists(local):
        return None
    if not os.path.exists(local):
        return "a link to nowhere"
    if not os.path.isdir(local):
        return "a file"
    return "a directory that is not a usable checkpoint" if os.listdir(local) else \
        "an empty directory"


def inside(root: epath.Path, path: epath.Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``root``; always True on stores."""
    if is_remote(root):
        return True
    real_root = os.path.realpath(str(root))
    return os.path.realpath(str(path)).startswith(real_root + os.sep)
