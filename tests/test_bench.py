"""The bench scripts run end to end in a tiny mode and write every figure.

No timing is asserted: the figures are whatever this machine gives. What is checked is
the result document: every key scripts read, and ratios that are positive finite numbers.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from ckptbench import figures, measure, report  # noqa: E402

RATIOS = {"throughput_ratio", "blocking_over_d2h", "policy_over_orbax", "persist_over_disk",
          "restore_over_disk", "peak_ram_over_state"}
VS_ORBAX = {"throughput_over_orbax", "save_cpu_over_orbax", "persist_over_orbax",
            "restore_over_orbax"}
RAW = {"step_s", "save_every_steps", "steps_per_s", "orbax_throughput_ratio", "save_blocking_s",
       "sync_save_blocking_s", "first_step_after_save_s", "d2h_s", "persist_s", "persist_Bps",
       "disk", "restore_cold_s", "restore_Bps", "restore_exact", "orbax_restore_Bps",
       "first_save_peak_extra_rss_bytes", "first_save_peak_over_rest_bytes",
       "first_save_peak_extra_private_bytes", "first_save_peak_rss_over_state",
       "per_save_transient_private_bytes",
       "loop_peak_over_rest_bytes", "per_save_transient_rss_bytes", "save_cpu_s",
       "jaxckpt_own_s", "save_blocking_p50_minus_orbax_s", "lost_per_save_over_host_copy",
       "idle_save_cpu_s", "orbax_save_cost_training_s", "throughput_over_orbax_per_round",
       "throughput_over_orbax_pooled", "throughput_over_orbax_interval"}
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


SCRIPTS = {
    # --interval 0.2: the step time is measured over ~0.1 s of steps, not 2 s
    "overhead": ["overhead.py", "--sizes", "1", "--steps", "2", "--interval", "0.2",
                 "--rounds", "1", "--blocking-reps", "1", "--layers", "2", "--auto-steps", "10",
                 "--tuning-size", "1", "--tuning-variants", "1", "--leaves", "30",
                 "--dir", "{tmp}/work", "--json", "{tmp}/overhead.json",
                 "--markdown", "{tmp}/overhead.md"],
    "ledger": ["ledger.py", "--calls", "400", "--json", "{tmp}/ledger.json",
               "--markdown", "{tmp}/ledger.md"],
    "import_time": ["import_time.py", "--reps", "1", "--checkpoints", "2",
                    "--json", "{tmp}/import_time.json"],
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Start every script's tiny run at once (mostly single-threaded start-up work, so
    they overlap well on 2 cores); ``smoke(name)`` waits for one and returns
    ``(exit code, log, result JSON, its directory)``."""
    tmp = tmp_path_factory.mktemp("bench")
    procs = {}
    for name, args in SCRIPTS.items():
        log = open(tmp / f"{name}.log", "w")
        cmd = [sys.executable, str(ROOT / "bench" / args[0])] + [
            a.format(tmp=tmp) for a in args[1:]]
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                        cwd=ROOT), log)

    def wait(name):
        proc, log = procs[name]
        rc = proc.wait(timeout=240)
        log.close()
        text = (tmp / f"{name}.log").read_text()[-6000:]
        out = tmp / f"{name}.json"
        return rc, text, json.loads(out.read_text()) if out.exists() else None, tmp

    yield wait
    for proc, log in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def assert_positive_finite(ratios: dict):
    bad = {k: v for k, v in ratios.items()
           if not isinstance(v, float) or not math.isfinite(v) or v <= 0}
    assert not bad, bad


def test_overhead_tiny_run_writes_every_key(smoke):
    rc, log, result, tmp = smoke("overhead")
    assert rc == 0, log

    assert {"machine", "config", "targets", "sizes", "many_leaves", "auto", "tuning",
            "summary", "orbax"} <= set(result)
    assert RATIOS | VS_ORBAX <= set(result["targets"])
    (size,) = result["sizes"]
    # Raw Orbax's first save ran in its own process and is filed beside jaxckpt's.
    assert set(size["ratios"]) == RATIOS | VS_ORBAX | {"first_save_peak_ram_over_orbax"}
    (orbax_first,) = result["orbax_first_saves"]
    assert orbax_first["size_mb"] == size["size_mb"] and orbax_first["every"] >= 2
    assert size["raw"]["orbax_first_save_peak_extra_rss_bytes"] == \
        orbax_first["first"]["peak_extra_rss"] > 0
    assert size["raw"]["orbax_first_save_peak_extra_private_bytes"] == \
        orbax_first["first"]["peak_extra_private"]
    # A first save's peak is taken over the same loop's own peak without a save, in
    # the RSS and in its private part (the RSS less file-backed pages, so never more).
    first = orbax_first["first"]
    assert first["peak_extra_rss"] == first["period"]["peak_rss"] - max(
        [first["rss_train"]] + [b["peak_rss"] for b in first["loops"]])
    assert first["peak_extra_private"] == first["period"]["peak_private"] - max(
        [first["private_train"]] + [b["peak_private"] for b in first["loops"]])
    assert 0 < first["period"]["peak_private"] < first["period"]["peak_rss"]
    assert size["ratios"]["peak_ram_over_state"] == pytest.approx(
        size["raw"]["first_save_peak_extra_private_bytes"] / size["state_bytes"])
    assert size["raw"]["first_save_peak_over_rest_bytes"] == \
        size["raw"]["first_save_peak_extra_rss_bytes"] + size["raw"]["loop_peak_over_rest_bytes"]
    assert_positive_finite(size["ratios"])
    assert RAW <= set(size["raw"])
    assert {"p50", "p95"} <= set(size["raw"]["save_blocking_s"]["jaxckpt"])
    assert {"p50", "p95"} <= set(size["raw"]["sync_save_blocking_s"])
    assert {"numpy_copy_p50", "device_get_p50", "floor"} <= set(size["raw"]["d2h_s"])
    assert set(size["raw"]["lost_per_save_over_host_copy"]) == {"jaxckpt", "orbax"}
    assert size["raw"]["restore_exact"] is True
    # Each kind ran in a process of its own (malloc settings are per process).
    pids = size["raw"]["processes"]
    assert set(pids) == {"none", "jaxckpt", "orbax"} and len(set(pids.values())) == 3
    assert {"start", "end"} <= set(size["load"])
    leaves = result["many_leaves"]
    assert leaves["n_leaves"] >= 30
    assert set(leaves["ratios"]) == {"save_per_leaf_over_orbax", "restore_per_leaf_over_orbax",
                                     "blocking_over_orbax"}
    assert_positive_finite(leaves["ratios"])
    assert RATIOS | VS_ORBAX | {"auto_budget_held", "save_per_leaf_over_orbax"} <= set(
        result["summary"])
    assert {"overhead_budget", "chosen_every_n_steps", "measured_overhead",
            "budget_held"} <= set(result["auto"])
    (variant,) = result["tuning"]["variants"].values()
    assert {"persist_s", "cpu_s", "first_save_peak_ram_over_state", "cold_restore_s",
            "first_save_peak_rss_over_state"} <= set(variant)
    text = (tmp / "overhead.md").read_text()
    assert "throughput_ratio" in text and "restore_per_leaf_over_orbax" in text
    assert not any((tmp / "work").iterdir())  # checkpoints cleaned up


def test_ledger_reports_windows_of_calls_that_write_nothing(smoke):
    rc, log, result, tmp = smoke("ledger")
    assert rc == 0, log

    assert result["finished"] and result["calls_done"] == 400
    assert result["calls_written"] == 1  # the first call is a new best; no other is due
    assert result["history_entries"] == 400
    assert len(result["windows"]) == 10
    assert sum(w["calls"] for w in result["windows"]) == 399
    assert {"p50_s", "p99_s", "first_call", "last_call"} <= set(result["windows"][0])
    assert set(result["ratios"]) == {"last_over_first_p50", "last_over_first_p99"}
    assert_positive_finite(result["ratios"])
    assert "| calls | p50 |" in (tmp / "ledger.md").read_text()


def test_import_time_reports_each_command_and_its_heavy_modules(smoke):
    rc, log, result, _ = smoke("import_time")
    assert result is not None, log
    # A command that fails (exit code, stderr) is reported, and fails the script.
    assert (rc == 0) == (not result["errors"]), log
    assert set(result["seconds"]) == {"python -c pass", "import orbax.checkpoint",
                                      "import jaxckpt", "jaxckpt --version", "jaxckpt ls DIR"}
    assert set(result["modules"]) == set(result["seconds"])
    assert "jax" in result["modules"]["import jaxckpt"]["stack"]
    assert result["modules"]["python -c pass"]["heavy"] == []
    assert {"import_jaxckpt_over_orbax", "ls_over_import"} <= set(result["ratios"])
    assert_positive_finite(result["ratios"])
    assert set(result["met"]) == {"import_jaxckpt_over_orbax", "ls_minus_import_s"}


def _period(s, cpu=0.0, blocked=0.0):
    return {"s": s, "cpu_s": cpu, "blocked": blocked, "first_step": 0.01, "peak_rss": 10,
            "rss_before": 4, "peak_private": 8, "private_before": 3}


def test_figures_are_quotients_of_medians():
    blocks = {"none": [_period(1.0), _period(1.2), _period(1.1)],
              "jaxckpt": [_period(1.5, blocked=0.02)] * 3,
              "orbax": [_period(1.3, blocked=0.01)] * 3}
    assert figures.steps_per_s(blocks["none"], every=10) == pytest.approx(30 / 3.3)
    assert figures.lost_per_save(blocks, "jaxckpt") == pytest.approx(0.4)
    ratios, raw = figures.size_figures({
        "state_bytes": 100, "every": 10, "step_s": 0.1, "on_cpu": True, "rounds": 3,
        "model": {}, "platform": "cpu", "blocks": blocks,
        "first": {"rss_train": 0, "period": blocks["jaxckpt"][0], "peak_extra_rss": 50,
                  "peak_extra_private": 40, "peak_over_rest": 70,
                  "loop_peak_over_rest": 20},
        "extra_blocking": {"jaxckpt": [0.02], "orbax": [0.01]}, "sync": [0.3],
        "d2h": {"copy": [0.2, 0.2, 0.2], "device_get": [0.001] * 3},
        "writes": {"wall_s": {"jaxckpt": [2.0, 2.0, 9.0], "orbax": [1.0, 1.0, 1.0]},
                   "cpu_s": {"jaxckpt": [0.5] * 3, "orbax": [0.25] * 3},
                   "disk_write_Bps": [100.0] * 3},
        "reads": {"restore_s": {"jaxckpt": [1.0, 3.0, 3.0], "orbax": [2.0] * 3},
                  "disk_read_Bps": [200.0] * 3, "exact": True, "warm_s": 0.1,
                  "verify_cold_s": None, "verify_cold_bytes": None},
        "bytes_on_disk": 100, "orbax": {}, "disk_method": ""})
    assert ratios["throughput_over_orbax"] == pytest.approx(1.3 / 1.5)
    assert ratios["persist_over_orbax"] == pytest.approx(0.5)  # median 2 s vs 1 s
    assert ratios["restore_over_orbax"] == pytest.approx(1.5)  # median 3 s vs 2 s
    assert ratios["save_cpu_over_orbax"] == pytest.approx(2.0)
    assert ratios["peak_ram_over_state"] == pytest.approx(0.4)  # private memory
    assert raw["first_save_peak_rss_over_state"] == pytest.approx(0.5)
    assert raw["lost_per_save_over_host_copy"]["jaxckpt"] == pytest.approx(0.4 / 0.2)
    assert raw["save_blocking_p50_minus_orbax_s"] == pytest.approx(0.01)
    assert raw["throughput_over_orbax_pooled"] == pytest.approx(1.3 / 1.5)
    # per round: 1.5 - (1.0, 1.2, 1.1) -> median 0.4; jaxckpt - Orbax 0.2 in every round
    assert raw["lost_per_save_paired_over_host_copy"]["jaxckpt"] == pytest.approx(0.4 / 0.2)
    assert raw["lost_per_save_paired_over_host_copy"]["orbax"] == pytest.approx(0.2 / 0.2)
    assert raw["lost_per_save_minus_orbax_over_host_copy"] == pytest.approx(0.2 / 0.2)
    check = next(c for c in report.VS_ORBAX
                 if c.key == "lost_per_save_minus_orbax_over_host_copy")
    assert not check.met({"ratios": ratios, "raw": raw})  # 2.0 host copies against 1.0


def _size_inputs(blocks: dict, host_copy_s: float) -> dict:
    """``figures.size_figures``'s input around ``blocks``: every other phase one plain
    sample, for tests about the periods."""
    return {
        "state_bytes": 100, "every": 10, "step_s": 0.1, "on_cpu": True,
        "rounds": len(blocks["none"]), "model": {}, "platform": "cpu", "blocks": blocks,
        "first": {"rss_train": 0, "period": blocks["jaxckpt"][0], "peak_extra_rss": 50,
                  "peak_extra_private": 40, "peak_over_rest": 70, "loop_peak_over_rest": 20},
        "extra_blocking": {"jaxckpt": [], "orbax": []}, "sync": [0.3],
        "d2h": {"copy": [host_copy_s], "device_get": [0.001]},
        "writes": {"wall_s": {"jaxckpt": [1.0], "orbax": [1.0]},
                   "cpu_s": {"jaxckpt": [0.5], "orbax": [0.5]}, "disk_write_Bps": [100.0]},
        "reads": {"restore_s": {"jaxckpt": [1.0], "orbax": [1.0]}, "disk_read_Bps": [200.0],
                  "exact": True, "warm_s": 0.1, "verify_cold_s": None,
                  "verify_cold_bytes": None},
        "bytes_on_disk": 100, "orbax": {}, "disk_method": ""}


def test_lost_per_save_against_orbax_compares_periods_of_the_same_round():
    # The machine slows down over the run, and another tenant disturbs jaxckpt's period
    # in round 3; in every other round jaxckpt's period is 0.1 s shorter than Orbax's.
    # Unpaired medians (4.2 against 3.3 s) would call jaxckpt 0.9 s slower per save.
    blocks = {"none": [_period(s) for s in (1.0, 2.0, 3.0, 4.0, 5.0)],
              "jaxckpt": [_period(s, blocked=0.01) for s in (1.2, 2.2, 5.0, 4.2, 5.2)],
              "orbax": [_period(s, blocked=0.01) for s in (1.3, 2.3, 3.3, 4.3, 5.3)]}
    assert figures.lost_per_save(blocks, "jaxckpt") > figures.lost_per_save(blocks, "orbax")
    assert figures.per_round_lost(blocks, "jaxckpt", "orbax") == pytest.approx(
        [-0.1, -0.1, 1.7, -0.1, -0.1])
    _, raw = figures.size_figures(_size_inputs(blocks, host_copy_s=0.05))
    assert raw["lost_per_save_minus_orbax_over_host_copy"] == pytest.approx(-0.1 / 0.05)
    check = next(c for c in report.VS_ORBAX
                 if c.key == "lost_per_save_minus_orbax_over_host_copy")
    assert check.met({"raw": raw})
    assert not check.met({"raw": {"lost_per_save_minus_orbax_over_host_copy": 0.5}})


def test_throughput_over_orbax_is_the_median_of_rounds_not_swayed_by_one_slow_period():
    # Round 2's jaxckpt period was disturbed (4 s instead of 1): the pooled steps/s
    # quotient falls to 0.55, the median of the rounds stays at jaxckpt's usual 1.1.
    blocks = {"none": [_period(0.9)] * 3,
              "jaxckpt": [_period(s, blocked=0.02) for s in (1.0, 4.0, 1.0)],
              "orbax": [_period(1.1, blocked=0.02)] * 3}
    assert figures.per_round_speedup(blocks, "jaxckpt", "orbax") == pytest.approx(
        [1.1, 1.1 / 4.0, 1.1])
    ratios, raw = figures.size_figures(_size_inputs(blocks, host_copy_s=0.2))
    assert ratios["throughput_over_orbax"] == pytest.approx(1.1)
    assert raw["throughput_over_orbax_pooled"] == pytest.approx(3.3 / 6.0)
    assert raw["throughput_over_orbax_per_round"] == pytest.approx([1.1, 0.275, 1.1])
    # 3 rounds: the whole range, which holds the median 75 % of the time
    assert raw["throughput_over_orbax_interval"] == pytest.approx(
        {"low": 0.275, "high": 1.1, "coverage": 0.75})


def test_the_median_interval_narrows_with_rounds_at_its_stated_coverage():
    seven = [1.07, 0.91, 0.99, 1.02, 0.95, 1.11, 0.97]
    assert measure.median_interval(seven) == pytest.approx(
        {"low": 0.91, "high": 1.11, "coverage": 1 - 2 / 128})
    nine = seven + [0.80, 1.30]
    assert measure.median_interval(nine) == pytest.approx(
        {"low": 0.91, "high": 1.11, "coverage": 1 - 2 * 10 / 512})
    assert measure.median_interval(nine, level=0.8) == pytest.approx(
        {"low": 0.95, "high": 1.07, "coverage": 1 - 2 * 46 / 512})
    # Its coverage is what it says: over many samples of 7 from a known distribution,
    # the interval holds the true median at least that often.
    import random
    rng = random.Random(0)
    held = sum(lo <= 0.0 <= hi for lo, hi in (
        (i["low"], i["high"]) for i in (
            measure.median_interval([rng.gauss(0, 1) for _ in range(7)], level=0.6)
            for _ in range(4000))))
    got = measure.median_interval(list(range(7)), level=0.6)["coverage"]
    assert got == pytest.approx(1 - 2 * 8 / 128)  # k=2: x(2)..x(6), 87.5 %
    assert held / 4000 == pytest.approx(got, abs=0.02)
