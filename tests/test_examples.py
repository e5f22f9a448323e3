"""The examples run as a reader would run them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def reader_env(**extra):
    """A reader's machine: one CPU device (not the tests' four); compiled programs come
    from the session's cache (conftest) when an earlier run compiled them."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **extra}


def test_nnx_example(tmp_path, digits_dir):
    from jaxckpt.examples import fit_digits_nnx
    result = fit_digits_nnx.main(["--workdir", str(tmp_path), "--epochs", "2", "--quiet",
                                  "--data-dir", str(digits_dir)])
    assert result["test_accuracy"] > 0.8
    assert (tmp_path / "history.png").exists()


def test_crash_and_resume_example(tmp_path, digits_dir):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "crash_and_resume.py"),
                          "--workdir", str(tmp_path), "--epochs", "3"],
                         capture_output=True, text=True,
                         env=reader_env(JAXCKPT_DATA_DIR=str(digits_dir)))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "killed the run with SIGKILL" in out.stdout
    assert "identical to the reference: True" in out.stdout


def test_readme_numbers_are_what_the_demo_prints(tmp_path, digits_dir):
    """The README's demo numbers come from `python -m jaxckpt.demo --readme README.md`; the
    same command with --check reruns the demo (one CPU device, as the README's) and compares."""
    import re

    from jaxckpt import demo

    env = reader_env(JAXCKPT_DATA_DIR=str(digits_dir), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "jaxckpt.demo", "--check",
                          str(REPO / "README.md"), "--workdir", str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    printed = next(line for line in out.stdout.splitlines() if line.startswith("best checkpoint"))
    val_loss, val_acc, test_acc = map(float, re.search(
        r"val_loss ([\d.]+), val_accuracy ([\d.]+)\); test accuracy ([\d.]+)", printed).groups())
    quoted = demo.parse_numbers(demo.readme_block((REPO / "README.md").read_text()))
    shown = {"test_accuracy": test_acc, "best_val_loss": val_loss, "best_val_accuracy": val_acc}
    for key, value in shown.items():  # another CPU model rounds differently (demo.TOLERANCE)
        assert abs(quoted[key] - value) <= demo.TOLERANCE[key] + 0.0005, key
    assert f"wrote: {tmp_path / 'checkpoints'} (checkpoints), {tmp_path / 'history.csv'}" \
        in out.stdout


def test_the_demo_check_allows_another_cpus_rounding_but_not_another_result():
    from jaxckpt import demo

    readme = ("**test accuracy 0.996** (best `val_loss` 0.025 at epoch 20 of 30, "
              "`val_accuracy` 0.993; seed 0, CPU)")
    assert demo.agree(readme, readme.replace("0.996", "0.993").replace("0.025", "0.023"))
    assert not demo.agree(readme, readme.replace("0.996", "0.985"))  # four digits wrong
    assert not demo.agree(readme, readme.replace("epoch 20", "epoch 21"))
    assert not demo.agree(readme, readme.replace("0.025", "0.040"))
    with pytest.raises(ValueError, match="no demo numbers"):
        demo.parse_numbers("test accuracy: high")


def readme_trainer_example() -> str:
    text = (REPO / "README.md").read_text()
    after = text.split("<!-- readme-trainer-example")[1]
    return after.split("```python\n")[1].split("```")[0]


def test_readme_trainer_example_trains_on_xy_with_a_callback_csv_and_tensorboard(tmp_path):
    code = readme_trainer_example().replace("/tmp/xy-run", str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=reader_env())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "new run in" in out.stdout and "'accuracy'" in out.stdout
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy") and len(rows) >= 2
    assert len(rows) - 1 < 30  # StopWhenGood ended the run before its 30 epochs
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "history.png").stat().st_size > 10_000
