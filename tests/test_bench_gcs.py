"""bench/gcs.py in a tiny mode: it runs, counts real requests and reports every key."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gcs_bench_counts_requests_of_both_libraries(tmp_path):
    out = tmp_path / "gcs.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gcs.py"), "--saves", "2",
                           "--mib", "0.1", "--leaves", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in ("jaxckpt", "orbax"):
        row = result["rows"][name]
        assert len(row["blocking_s"]) == len(row["requests"]) == 2
        # Every save writes objects and every restore reads some: a proxy that saw nothing
        # would report zeros.
        assert min(row["requests"]) > 0 and row["requests_per_save_by_method"]["POST"] > 0
        assert row["restore_requests"] > 0 and row["restore_s"] > 0
    assert set(result["ratios"]) == {"requests_per_save_over_orbax", "restore_requests_over_orbax"}
    assert "blocking_p50_minus_orbax_s" in result["raw"]
    assert "requests per save" in proc.stdout
