"""One writer per checkpoint directory: a lock file with an owner and a heartbeat.

Two runs writing the same directory would delete each other's checkpoints (each applies
its own retention policy) and clean up each other's in-flight writes. A writing
:class:`~jaxckpt.CheckpointManager` therefore holds ``DIR/jaxckpt.lock``::

    {"format": "jaxckpt-lock/1", "run_id": "3f2a...", "host": "node-7", "pid": 4242,
     "pid_start": 1718000000.5, "started": 1718000000.9, "heartbeat": 1718000042.0, ...}

A background thread rewrites ``heartbeat`` every :data:`HEARTBEAT_S` seconds and checks
that the file still names this run. The lock of a run that is gone is taken over, with a
warning: on the same host when its process no longer exists (or its pid now belongs to a
newer process), anywhere when its heartbeat is older than :data:`STALE_AFTER_S`. Hosts
are compared by name and PID namespace, so two containers with one hostname never judge
each other's PIDs. An unreadable lock file (garbage, a hand edit) names no owner, so it
is judged by when it last changed: taken over once older than :data:`STALE_AFTER_S`,
respected before that, and a live owner that finds its own lock unreadable rewrites it.
A run whose lock was taken over learns it, and why, at its next save and stops writing.

On a local disk the lock is created with an atomic ``link``, so of two runs starting at
once exactly one wins. Object stores (``gs://``) have no such primitive: there the lock
is best-effort (write, then read back the owner), and the heartbeat check catches what
the read-back missed.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
import warnings
import weakref
from typing import Any

from etils import epath

from jaxckpt import storage
from jaxckpt.errors import DirectoryLockedError

__all__ = ["DirectoryLock", "LOCK_FILE", "HEARTBEAT_S", "STALE_AFTER_S"]

log = logging.getLogger("jaxckpt")

LOCK_FILE = "jaxckpt.lock"
_FORMAT = "jaxckpt-lock/1"
HEARTBEAT_S = 5.0
"""How often a writer refreshes its lock."""
STALE_AFTER_S = 120.0
"""A lock whose heartbeat is older than this is taken over (hosts' clocks may differ a little)."""

# Locks held by this process, by run id: a lock naming this pid is live only if listed here.
_held: "weakref.WeakValueDictionary[str, DirectoryLock]" = weakref.WeakValueDictionary()


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _process_start(pid: int) -> float | None:
    try:
        import psutil
        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no such process, or no psutil: judge by pid alone
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _readable(owner: dict) -> bool:
    """Whether ``owner`` is a lock record whose heartbeat can be judged."""
    return (isinstance(owner, dict) and owner.get("format") == _FORMAT
            and isinstance(owner.get("heartbeat"), (int, float)))


def describe(owner: dict, now: float | None = None) -> str:
    """``run R on host H, pid P, last heartbeat N s ago`` for messages.

    Fields the record lacks are left out (never printed as ``None``); a record with
    none of them is ``an unreadable lock``.
    """
    now = time.time() if now is None else now
    run, host, pid = (owner.get(k) for k in ("run_id", "host", "pid"))
    who = " ".join(part for part in (f"run {run}" if run is not None else "",
                                     f"on host {host}" if host is not None else "")
                   if part)
    parts = [who] if who else []
    if pid is not None:
        parts.append(f"pid {pid}")
    if not parts:
        return "an unreadable lock"
    beat = owner.get("heartbeat")
    if isinstance(beat, (int, float)):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(beat))
        parts.append(f"last heartbeat {now - beat:.0f} s ago ({when})")
    else:
        parts.append("no heartbeat")
    return ", ".join(parts)


class DirectoryLock:
    """The write lock of one checkpoint directory, held by one run.

    Args:
      directory: the checkpoint directory (local or ``gs://``).
      heartbeat_s, stale_after_s: see :data:`HEARTBEAT_S`, :data:`STALE_AFTER_S`.
      timeout: deadline of each read or write of the lock on an object store (the
        manager's ``storage_timeout_s``); a heartbeat waits at most a quarter of
        ``stale_after_s``, so that a stall is reported well before a takeover.
    """

    def __init__(self, directory: epath.Path, *, heartbeat_s: float | None = None,
                 stale_after_s: float | None = None,
                 timeout: float | None = storage.DEFAULT_TIMEOUT_S):
        self.directory = directory
        self.path = directory / LOCK_FILE
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
        self.timeout = timeout
        self.beat_timeout = max(self.stale_after_s / 4, 1.0)
        if timeout is not None:
            self.beat_timeout = min(self.beat_timeout, timeout)
        self._beating = threading.Lock()  # held while a heartbeat waits for the store
        self.run_id = uuid.uuid4().hex
        self._local = "://" not in str(directory)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None  # why this run lost the lock, once it has
        self._started: float | None = None
        self._last_beat: float | None = None  # when this run last wrote its heartbeat
        self._held = False
        self._pid = os.getpid()
        self._write_error: str | None = None

    # -- public ------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock, taking over a stale one with a warning.

        Raises:
          DirectoryLockedError: a live run holds it (named in the message, with the fix).
        """
        for _ in range(5):
            owner = self._read()
            if owner is None:
                if self._create():
                    break
                continue  # another run created it just now: judge that one
            why = self._why_stale(owner)
            if why is None:
                raise DirectoryLockedError(self._locked_message(owner))
            if self._take_over(owner):
                of = f" of {describe(owner)}" if _readable(owner) else ""
                warnings.warn(f"taking over the stale lock {self.path}{of}: {why}.",
                              stacklevel=4)
                break
        else:
            raise DirectoryLockedError(f"could not take the lock {self.path}: other runs keep "
                                       "replacing it. Is another run starting on this "
                                       "directory right now?")
        owner = self._read()
        if owner is None:
            raise DirectoryLockedError(f"the lock {self.path} vanished right after this run "
                                       "wrote it. Is another run starting on this directory "
                                       "right now?")
        if owner.get("run_id") != self.run_id:
            raise DirectoryLockedError(self._locked_message(owner))
        self._held, self._pid = True, os.getpid()
        self._started, self._last_beat = owner.get("started"), owner.get("heartbeat")
        _held[self.run_id] = self
        self._thread = threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._stop),
                                        name="jaxckpt-lock", daemon=True)
        self._thread.start()
        log.debug("locked %s as run %s", self.directory, self.run_id)

    def check(self) -> None:
        """Raise if another run took the lock over since this run acquired it."""
        if self._lost is not None:
            raise DirectoryLockedError(
                f"this run lost the lock of {self.directory}: {self._lost}. This run no "
                "longer writes there; its checkpoints up to now are intact. Save into "
                "another directory, or stop the other run and start again.")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it still names this run."""
        if not self._held or os.getpid() != self._pid:  # a forked child owns nothing
            return
        self._held = False
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        _held.pop(self.run_id, None)

        def remove():
            owner = self._read()
            if owner is not None and owner.get("run_id") == self.run_id:
                self._io(self.path.unlink, "removing")
        try:  # no longer than a heartbeat: a lock left behind is taken over once stale
            storage.call(remove, what="removing the lock", path=self.path,
                         timeout=self.beat_timeout)
        except OSError as e:  # a StorageTimeoutError too: a stalled store
            log.warning("could not remove the lock %s (%s); the next run takes it over "
                        "as stale", self.path, e)

    # -- internals ---------------------------------------------------------------------

    def _io(self, fn, what: str, *args):
        """``fn(*args)`` on the lock file, with the deadline of a storage call."""
        return storage.call(fn, *args, what=what, path=self.path, timeout=self.timeout)

    def _record(self) -> dict:
        now = time.time()
        started = now if self._started is None else self._started
        return {"format": _FORMAT, "run_id": self.run_id, "host": socket.gethostname(),
                "pid": os.getpid(), "pid_ns": _pid_namespace(),
                "pid_start": _process_start(os.getpid()), "started": started,
                "heartbeat": now, "heartbeat_s": self.heartbeat_s}

    def _read(self) -> dict | None:
        """The lock's owner record; None when there is no lock; ``{}`` when unreadable.

        An unreadable record is read again twice, 50 ms apart, before it counts: a read
        can land in the middle of a live owner's heartbeat rewrite where a store replaces
        objects in place (the GCS emulator's file backend does; seen in CI).
        """
        owner = self._read_once()
        for _ in range(2):
            if owner != {}:
                break
            time.sleep(0.05)
            owner = self._read_once()
        return owner

    def _read_once(self) -> dict | None:
        try:
            text = self._io(self.path.read_text, "reading")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:  # garbage bytes: a damaged lock, judged stale below
            return {}
        try:
            owner = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def _create(self) -> bool:
        """Create the lock naming this run; False when another run's lock appeared first."""
        text = json.dumps(self._record())
        if not self._local:
            self._io(self.path.write_text, "writing", text)
            time.sleep(0.2)  # let a concurrent writer's object land, then read back
            owner = self._read()
            return owner is not None and owner.get("run_id") == self.run_id
        tmp = self.directory / f".{LOCK_FILE}.{self.run_id}.tmp"
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)  # atomic, and fails if the lock exists
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            # A filesystem without hard links: O_EXCL would expose a half-written file,
            # so rename and rely on the read-back in acquire().
            if self.path.exists():
                return False
            os.replace(tmp, self.path)
            return True
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)

    def _take_over(self, stale: dict) -> bool:
        """Replace the ``stale`` lock with this run's; False if it changed meanwhile."""
        if not self._local:
            return self._create()
        aside = self.directory / f".{LOCK_FILE}.{self.run_id}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._create()
        try:
            moved = json.loads(aside.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            moved = {}
        if not isinstance(moved, dict):
            moved = {}
        if moved.get("run_id") != stale.get("run_id"):
            # Someone replaced the stale lock between our read and the rename: put it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return self._create()

    def _why_stale(self, owner: dict) -> str | None:
        """Why ``owner``'s lock may be taken over, or None when that run may be alive."""
        now = time.time()
        if not _readable(owner):
            # Garbage proves nothing, not even that the owner is gone: judge by when the
            # store last saw the file change (a live owner repairs it at its next beat).
            age = self._age(now)
            if age is None:
                return "the lock file is unreadable and its age cannot be looked up"
            if age > self.stale_after_s:
                return (f"the lock file is unreadable and was last modified {age:.0f} s ago "
                        f"(> {self.stale_after_s:.0f} s)")
            return None
        beat = owner["heartbeat"]
        pid = owner.get("pid")
        same_host = (owner.get("host") == socket.gethostname()
                     and owner.get("pid_ns") == _pid_namespace() and isinstance(pid, int))
        if same_host:
            if pid == os.getpid():
                if owner.get("run_id") not in _held:
                    return "no CheckpointManager of this process holds it any more"
                return None
            if not _pid_alive(pid):
                return f"process {pid} is no longer running"
            started, recorded = _process_start(pid), owner.get("pid_start")
            if started is not None and isinstance(recorded, (int, float)) and \
                    abs(started - recorded) > 1.0:
                return f"pid {pid} now belongs to another process"
        if beat > now + self.stale_after_s:
            # A heartbeat from the future (a skewed clock, a hand-edited file) proves
            # nothing: judge by when the store last saw the file change.
            age = self._age(now)
            if age is None or age > self.stale_after_s:
                return (f"its heartbeat lies {beat - now:.0f} s in the future and the file "
                        f"has not changed for more than {self.stale_after_s:.0f} s")
            return None
        if now - beat > self.stale_after_s:
            return f"its last heartbeat is {now - beat:.0f} s old (> {self.stale_after_s:.0f} s)"
        return None

    def _age(self, now: float) -> float | None:
        """Seconds since the lock file last changed (never negative); None if unknown."""
        try:
            changed = self._io(self.path.stat, "looking up").mtime
        except (OSError, AttributeError):
            return None
        return max(now - changed, 0.0)

    def _locked_message(self, owner: dict) -> str:
        if not _readable(owner):
            age = self._age(time.time())
            when = "recently" if age is None else f"{age:.0f} s ago"
            return (f"the lock file {self.path} is unreadable and was modified {when}: "
                    "another run may hold it (a live run rewrites it at its next heartbeat). "
                    f"Wait until it is {self.stale_after_s:.0f} s old (it is then taken "
                    f"over), or delete {self.path} if no run writes here; open with "
                    "read_only=True to only read.")
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            return (f"another CheckpointManager in this process ({describe(owner)}) is writing "
                    f"to {self.directory}. close() it first, or open this one with "
                    "read_only=True to only read.")
        return (f"{self.directory} is being written by another run: {describe(owner)}. Two "
                "writers would delete each other's checkpoints. Wait for that run to end or "
                "stop it; open with read_only=True to only read; or save into another "
                f"directory. If that run is dead on another machine, delete {self.path} (it "
                f"is taken over by itself once its heartbeat is {self.stale_after_s:.0f} s "
                "old).")

    def _taken_over(self, owner: dict) -> str:
        """The cause of losing the lock to ``owner``, as far as this run can tell."""
        if self._last_beat is None:
            return f"it was taken over by {describe(owner)}"
        gap = time.time() - self._last_beat
        if gap > self.stale_after_s:
            return (f"it was taken over by {describe(owner)}: this run had not written its "
                    f"heartbeat for {gap:.0f} s (> {self.stale_after_s:.0f} s; a hung or "
                    "suspended process, or a stalled store?)")
        return (f"it was taken over by {describe(owner)}, although this run wrote its "
                f"heartbeat {gap:.0f} s before (the lock file was replaced by hand, or the "
                "other run judged it by a skewed clock)")

    def _beat(self) -> bool:
        """One heartbeat; False when the lock was lost (the thread then stops)."""
        try:
            owner = self._read()
            if self._stop.is_set():  # released while this beat waited for a stalled store
                return False
            if owner is None:  # deleted by hand: take it back unless someone else did
                if self._create():
                    log.warning("the lock %s was deleted while this run held it; wrote it "
                                "again", self.path)
                    self._last_beat = time.time()
                    return True
                owner = self._read()
                if owner is None or owner.get("run_id") in (None, self.run_id):
                    return True  # deleted again, or garbage: judged at the next beat
                self._lost = (f"the lock file was deleted, and {describe(owner)} created "
                              "it before this run could write it again")
                return False
            if owner.get("run_id") not in (None, self.run_id):
                self._lost = self._taken_over(owner)
                return False
            if not _readable(owner):  # garbage written over this run's lock: repair it
                log.warning("the lock %s became unreadable while this run held it; "
                            "rewrote this run's record", self.path)
                owner = self._record()
            owner["heartbeat"] = time.time()
            self._write(json.dumps(owner))
            self._last_beat = owner["heartbeat"]
            self._write_error = None
        except OSError as e:  # full disk, lost permission: the save path reports those
            if self._write_error != str(e):
                log.warning("cannot refresh the lock %s (%s); retrying every %.0f s",
                            self.path, e, self.heartbeat_s)
            self._write_error = str(e)
        return True

    def _write(self, text: str) -> None:
        """Replace the lock file whole with ``text``."""
        if not self._local:  # an object is replaced whole; object stores cannot rename
            self._io(self.path.write_text, "writing", text)
            return
        tmp = self.directory / f".{LOCK_FILE}.{self.run_id}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.write_text(text)
            tmp.replace(self.path)
        finally:
            if tmp.exists():
                tmp.unlink()


def _heartbeat(ref: "weakref.ref[DirectoryLock]", stop: threading.Event) -> None:
    interval = ref().heartbeat_s if ref() is not None else HEARTBEAT_S
    while not stop.wait(interval):
        lock = ref()
        if lock is None:
            return
        if not lock._beating.acquire(blocking=False):
            del lock
            continue  # the last beat still waits for a stalled store: warned already
        try:  # a stalled store must not stop the heartbeat silently
            alive = storage.call(_beat_once, lock, what="refreshing the lock",
                                 path=lock.path, timeout=lock.beat_timeout)
        except storage.StorageTimeoutError as e:
            log.warning("%s did not finish within %.0f s (a stalled store?); another run "
                        "may take this run's lock over if this lasts more than %.0f s",
                        e.operation, e.timeout_s, lock.stale_after_s)
            alive = True
        if not alive:
            return
        del lock


def _beat_once(lock: DirectoryLock) -> bool:
    try:
        return lock._beat()
    finally:
        lock._beating.release()


@atexit.register
def _release_all() -> None:
    for lock in list(_held.values()):
        lock.release()


def read_owner(directory: epath.Path) -> dict[str, Any] | None:
    """The record of the run holding ``directory``'s lock, or None when unlocked."""
    return DirectoryLock(directory)._read()
