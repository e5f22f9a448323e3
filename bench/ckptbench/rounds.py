"""Interleaved rounds over the workers of a case (``workers``), one operation at a time.

Orders are rotated or alternated between rounds, so load from other processes hits
every kind alike; each kind runs in its own process (see ``workers`` for why).
"""

from __future__ import annotations

from ckptbench.phases import KINDS, rotated
from ckptbench.progress import emit
from ckptbench.workers import Worker


def interleaved_periods(sides: dict[str, Worker], rounds: int) -> dict[str, list[dict]]:
    """``rounds`` rounds of (no save, jaxckpt, orbax) periods, the order rotated."""
    blocks: dict[str, list[dict]] = {"none": [], "jaxckpt": [], "orbax": []}
    for r in range(rounds):
        for kind in rotated(blocks, r):
            emit(f"round {r + 1}/{rounds}: {kind}")
            blocks[kind].append(sides[kind].call("period", kind=kind))
    return blocks


def blocking_saves(sides: dict[str, Worker], reps: int) -> dict[str, list[float]]:
    """More async saves for the blocking statistics, in alternating pairs."""
    emit("blocking")
    out: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(reps):
        for kind in rotated(KINDS, i):
            out[kind].append(sides[kind].call("blocking_save"))
    return out


def idle_writes(sides: dict[str, Worker], base: str, reps: int) -> dict:
    """Full writes (save, then wait; no training meanwhile), each round next to a plain
    sequential write of as many bytes (by the "none" worker, from its host copy), so
    that both see the same disk and host load.

    Returns wall and CPU seconds per kind, the disk's write bandwidth per round, and the
    plain files (kept for ``cold_reads``).
    """
    wall: dict[str, list[float]] = {k: [] for k in KINDS}
    cpu: dict[str, list[float]] = {k: [] for k in KINDS}
    files, disk = [], []
    for i in range(reps):
        emit(f"writes {i + 1}/{reps}")
        files.append(f"{base}/disk-bandwidth-{i}.bin")
        disk.append(sides["none"].call("disk_write", path=files[-1]))
        for kind in rotated(KINDS, i):
            s, c = sides[kind].call("idle_write")
            wall[kind].append(s)
            cpu[kind].append(c)
    return {"wall_s": wall, "cpu_s": cpu, "disk_write_Bps": disk, "files": files}


def cold_reads(sides: dict[str, Worker], files: list[str], local: bool) -> dict:
    """Cold restores of each kind's newest checkpoint, each round next to a cold plain
    read of as many bytes; jaxckpt's restore is checked bit for bit against a copy taken
    before its save.

    Each round restores in the order A B B A (B A A B the next round): whichever restore
    ran second in a round took 0.3-0.6 s longer at 512 MiB, for both kinds, and with one
    restore each per round the odd round decided which kind's median carried it."""
    emit("reads")
    sides["jaxckpt"].call("before_reads")
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    disk, exact = [], True
    for i, path in enumerate(files):
        disk.append(sides["none"].call("disk_read", path=path))
        order = rotated(KINDS, i)
        for kind in order + order[::-1]:
            got = sides[kind].call("cold_restore", local=local)
            times[kind].append(got["s"])
            if kind == "jaxckpt":
                exact = exact and bool(got["exact"])
    sides["none"].call("remove", paths=files)
    after = sides["jaxckpt"].call("warm_restore_and_verify", local=local)
    return {"restore_s": times, "disk_read_Bps": disk, "exact": exact, **after}
