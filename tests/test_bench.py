"""bench/overhead.py runs end to end in a tiny mode and writes every figure (no timings checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATIOS = {"throughput_ratio", "blocking_over_d2h", "policy_over_orbax", "persist_over_disk",
          "restore_over_disk", "peak_ram_over_state"}
RAW = {"step_s", "save_every_steps", "steps_per_s", "orbax_throughput_ratio", "save_blocking_s",
       "sync_save_blocking_s", "first_step_after_save_s", "d2h_s", "persist_s", "persist_Bps",
       "disk", "restore_cold_s", "restore_Bps", "restore_exact", "orbax_restore_Bps",
       "first_save_peak_extra_rss_bytes", "per_save_transient_rss_bytes", "save_cpu_s",
       "jaxckpt_own_s"}


def test_overhead_tiny_run_writes_every_key(tmp_path):
    out = tmp_path / "out.json"
    md = tmp_path / "out.md"
    cmd = [sys.executable, str(ROOT / "bench" / "overhead.py"), "--sizes", "1", "--steps", "2",
           "--rounds", "1", "--blocking-reps", "1", "--layers", "2", "--auto-steps", "10", "--tuning-size", "1",
           "--tuning-variants", "1", "--dir", str(tmp_path / "work"), "--json", str(out),
           "--markdown", str(md)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())

    assert {"machine", "config", "targets", "sizes", "auto", "tuning", "summary"} <= set(result)
    assert set(result["targets"]) == RATIOS
    (size,) = result["sizes"]
    assert set(size["ratios"]) == RATIOS
    assert all(isinstance(v, float) for v in size["ratios"].values())
    assert RAW <= set(size["raw"])
    assert {"p50", "p95"} <= set(size["raw"]["save_blocking_s"]["jaxckpt"])
    assert {"p50", "p95"} <= set(size["raw"]["sync_save_blocking_s"])
    assert {"numpy_copy_p50", "device_get_p50", "floor"} <= set(size["raw"]["d2h_s"])
    assert size["raw"]["restore_exact"] is True
    assert set(result["summary"]) == RATIOS | {"auto_budget_held"}
    assert {"overhead_budget", "chosen_every_n_steps", "measured_overhead",
            "budget_held"} <= set(result["auto"])
    (variant,) = result["tuning"]["variants"].values()
    assert {"persist_s", "cpu_s", "first_save_peak_ram_over_state", "cold_restore_s"} <= set(variant)
    assert "throughput_ratio" in md.read_text()
    assert not any((tmp_path / "work").iterdir())  # checkpoints cleaned up
