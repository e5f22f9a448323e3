"""The examples run as a reader would run them."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_nnx_example(tmp_path, monkeypatch):
    from jaxckpt.examples import fit_digits_nnx
    result = fit_digits_nnx.main(["--workdir", str(tmp_path), "--epochs", "2", "--quiet",
                                  "--data-dir", str(tmp_path / "tfds")])
    assert result["test_accuracy"] > 0.8
    assert (tmp_path / "history.png").exists()


def test_crash_and_resume_example(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "crash_and_resume.py"),
                          "--workdir", str(tmp_path), "--epochs", "3"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "killed the run with SIGKILL" in out.stdout
    assert "identical to the reference: True" in out.stdout
