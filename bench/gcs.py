"""``gs://`` (the local GCS emulator): save() blocking and HTTP requests per save, jaxckpt
beside raw Orbax on the same emulator.

Synopsis::

    python bench/gcs.py --saves 8 --mib 8 --json gcs.json --markdown gcs.md

On an object store every file operation is a request with a round trip, so what a layer
over Orbax adds shows as requests, not bytes. Both clients Orbax uses (TensorStore for the
arrays, google-cloud-storage/gcsfs for everything else) are pointed at a counting proxy in
front of fake-gcs-server; each request line is counted by method, per save (``save()``
plus ``wait()``, deletions of replaced checkpoints included) and per restore. jaxckpt
keeps the best and the latest checkpoint, raw Orbax ``max_to_keep=2``, both with the
state in ``PyTreeCheckpointHandler(use_compression=False)`` and the step's metrics
beside it; saves alternate between the two, so the emulator's state grows alike.
Public jaxckpt and Orbax API only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import socket
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the emulator helper

from ckptbench import measure  # noqa: E402
from ckptbench.report import markdown_table  # noqa: E402

RESTORES = 3
_REQUEST = re.compile(rb"(GET|HEAD|POST|PUT|PATCH|DELETE) \S+ HTTP/1\.[01]\r\n")


class CountingProxy:
    """A TCP proxy to ``upstream`` that counts the HTTP request lines clients send.

    Bodies pass through untouched; a request line is recognised by its full form
    (``METHOD target HTTP/1.x``), which array bytes do not produce by chance.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def snapshot(self) -> collections.Counter:
        with self._lock:
            return collections.Counter(self.counts)

    def _accept(self) -> None:
        while True:
            client, _ = self._server.accept()
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        tail = b""
        try:
            while data := src.recv(1 << 16):
                if count:
                    seen = tail + data
                    found = [m.group(1).decode() for m in _REQUEST.finditer(seen)
                             if m.end() > len(tail)]  # not counted in the last chunk
                    if found:
                        with self._lock:
                            self.counts.update(found)
                    tail = seen[-256:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--saves", type=int, default=8, help="saves per library (default 8)")
    p.add_argument("--mib", type=float, default=8.0, help="state size in MiB (default 8)")
    p.add_argument("--leaves", type=int, default=16, help="arrays in the state (default 16)")
    p.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    return p.parse_args(argv)


class _Jaxckpt:
    name = "jaxckpt"

    def __init__(self, directory: str):
        import jaxckpt
        self.m = jaxckpt.CheckpointManager(directory, jaxckpt.CheckpointPolicy(
            monitor="val_loss", keep_best=1, keep_latest=1))

    def save(self, step, state, loss):
        self.m.save(step, state, metrics={"val_loss": loss}, force=True)

    def wait(self):
        self.m.wait()

    def restore(self, step, target):
        return self.m.restore(step, target=target)

    def close(self):
        self.m.close()


class _Orbax:
    name = "orbax"

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp
        self.ocp = ocp
        self.m = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(max_to_keep=2),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(use_compression=False),
                           "metrics": ocp.JsonCheckpointHandler()})

    def save(self, step, state, loss):
        a = self.ocp.args
        self.m.save(step, args=a.Composite(state=a.PyTreeSave(state),
                                           metrics=a.JsonSave({"val_loss": loss})))

    def wait(self):
        self.m.wait_until_finished()

    def restore(self, step, target):
        a = self.ocp.args
        args = a.PyTreeRestore(target, restore_args=self.ocp.checkpoint_utils
                               .construct_restore_args(target))
        return self.m.restore(step, args=a.Composite(state=args))["state"]

    def close(self):
        self.m.close()


def measure_saves(savers, proxy: CountingProxy, state, target, saves: int, progress) -> dict:
    """Per library: save() blocking, requests per save (save + wait) and per restore."""
    import jax
    out = {s.name: {"blocking_s": [], "requests": [], "by_method": collections.Counter(),
                    "restore_requests": None, "restore_s": None} for s in savers}
    for step in range(1, saves + 1):
        order = savers if step % 2 else savers[::-1]
        for saver in order:
            loss = 1.0 / step if step % 3 else 10.0  # some saves are not a new best
            before = proxy.snapshot()
            t = time.perf_counter()
            saver.save(step, state, loss)
            out[saver.name]["blocking_s"].append(time.perf_counter() - t)
            saver.wait()
            delta = proxy.snapshot() - before
            out[saver.name]["requests"].append(sum(delta.values()))
            out[saver.name]["by_method"].update(delta)
            progress()
    times = {s.name: [] for s in savers}
    for _ in range(RESTORES):  # interleaved; the median, as a first call pays for start-up
        for saver in savers:
            before = proxy.snapshot()
            t = time.perf_counter()
            jax.block_until_ready(saver.restore(saves, target))
            times[saver.name].append(time.perf_counter() - t)
            out[saver.name]["restore_requests"] = sum((proxy.snapshot() - before).values())
    for name, ts in times.items():
        out[name]["restore_s"] = measure.pct(ts, 0.5)
    return out


def summarize(raw: dict, saves: int) -> dict:
    rows = {}
    for name, r in raw.items():
        rows[name] = {
            "blocking_p50_s": measure.pct(r["blocking_s"], 0.5),
            "blocking_p95_s": measure.pct(r["blocking_s"], 0.95),
            "requests_per_save_p50": measure.pct(r["requests"], 0.5),
            "requests_per_save_mean": sum(r["requests"]) / len(r["requests"]),
            "requests_per_save_by_method": {k: v / saves for k, v in
                                            sorted(r["by_method"].items())},
            "restore_requests": r["restore_requests"], "restore_s": r["restore_s"],
            "blocking_s": r["blocking_s"], "requests": r["requests"]}
    j, o = rows["jaxckpt"], rows["orbax"]
    ratios = {"requests_per_save_over_orbax": j["requests_per_save_mean"]
              / o["requests_per_save_mean"],
              "restore_requests_over_orbax": j["restore_requests"] / o["restore_requests"]}
    extra = {"blocking_p50_minus_orbax_s": j["blocking_p50_s"] - o["blocking_p50_s"]}
    return {"rows": rows, "ratios": ratios, "raw": extra}


def table(result: dict) -> dict:
    rows = result["rows"]
    methods = sorted({m for r in rows.values() for m in r["requests_per_save_by_method"]})

    def line(label, key, fmt):
        return [label] + [fmt(rows[n][key]) for n in ("jaxckpt", "orbax")]
    body = [
        line("save() blocks p50 / p95", "blocking_p50_s",
             lambda x: f"{1e3 * x:.1f} ms"),
        line("requests per save (save + wait), mean", "requests_per_save_mean",
             lambda x: f"{x:.1f}"),
        *[[f"  of which {m}"] + [f"{rows[n]['requests_per_save_by_method'].get(m, 0):.1f}"
                                 for n in ("jaxckpt", "orbax")] for m in methods],
        line("requests per restore (latest step, with a target)", "restore_requests", str),
        line(f"restore time (median of {RESTORES})", "restore_s", lambda x: f"{1e3 * x:.0f} ms"),
    ]
    body[0] = [body[0][0]] + [f"{1e3 * rows[n]['blocking_p50_s']:.1f} ms / "
                              f"{1e3 * rows[n]['blocking_p95_s']:.1f} ms"
                              for n in ("jaxckpt", "orbax")]
    return {"title": "gs:// on the emulator, per save", "columns": ["figure", "jaxckpt", "raw Orbax"],
            "rows": body}


def main(argv=None) -> int:
    args = parse_args(argv)
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    load_start = measure.load()
    from gcs_emulator import gcs_emulator
    from rich.progress import Progress

    with gcs_emulator(bucket="bench") as emu:
        host, port = emu.url.split("//", 1)[1].rsplit(":", 1)
        proxy = CountingProxy((host, int(port)))
        # Set before Orbax, TensorStore or gcsfs are imported: each reads them once.
        os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = proxy.url
        import jax
        import numpy as np

        n = max(1, int(args.mib * 2 ** 20 / 4 / args.leaves))
        rng = np.random.default_rng(0)
        state = {f"w{i}": jax.numpy.asarray(rng.standard_normal(n, dtype=np.float32))
                 for i in range(args.leaves)}
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding), state)
        run = f"run-{os.getpid()}"
        savers = [_Jaxckpt(emu.gs(run, "jaxckpt")), _Orbax(emu.gs(run, "orbax"))]
        try:
            with Progress(transient=True) as bar:
                task = bar.add_task("saves on gs://", total=2 * args.saves)
                raw = measure_saves(savers, proxy, state, target, args.saves,
                                    lambda: bar.advance(task))
        finally:
            for s in savers:
                s.close()
    result = {"command": "python bench/gcs.py " + " ".join(argv or sys.argv[1:]),
              "started": started, "elapsed_s": time.perf_counter() - t0,
              "config": vars(args), "state_bytes": n * 4 * args.leaves,
              "load": {"start": load_start, "end": measure.load()},
              **summarize(raw, args.saves)}
    spec = table(result)
    lines = [f"`{result['command']}` — {started}, {result['elapsed_s']:.0f} s; state "
             f"{result['state_bytes'] / 2 ** 20:.1f} MiB in {args.leaves} arrays, "
             f"{args.saves} saves each", "", *markdown_table(spec), "",
             f"requests per save, jaxckpt / raw Orbax: "
             f"{result['ratios']['requests_per_save_over_orbax']:.2f}; save() blocking p50 "
             f"difference: {1e3 * result['raw']['blocking_p50_minus_orbax_s']:+.1f} ms", ""]
    text = "\n".join(lines)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=measure.json_default)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
