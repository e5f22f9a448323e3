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


def test_readme_numbers_are_what_the_demo_prints(tmp_path, digits_dir, monkeypatch, capsys):
    """The README's demo numbers come from `python -m jaxckpt.demo --readme README.md`."""
    from jaxckpt import demo

    monkeypatch.setenv("JAXCKPT_DATA_DIR", str(digits_dir))
    result = demo.run(str(tmp_path), epochs=demo.README_EPOCHS, seed=demo.README_SEED,
                      quiet=True)
    printed = capsys.readouterr().out
    assert (f"val_loss {result['best_val_loss']:.4f}, val_accuracy "
            f"{result['best_val_accuracy']:.4f}); test accuracy "
            f"{result['test_accuracy']:.4f}") in printed
    assert f"wrote: {tmp_path / 'checkpoints'} (checkpoints), {tmp_path / 'history.csv'}" in printed
    assert demo.readme_block((REPO / "README.md").read_text()) == demo.readme_numbers(result)


def readme_trainer_example() -> str:
    text = (REPO / "README.md").read_text()
    after = text.split("<!-- readme-trainer-example")[1]
    return after.split("```python\n")[1].split("```")[0]


def test_readme_trainer_example_trains_on_xy_with_a_callback_csv_and_tensorboard(tmp_path):
    code = readme_trainer_example().replace("/tmp/xy-run", str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "new run in" in out.stdout and "'accuracy'" in out.stdout
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy") and len(rows) >= 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "history.png").stat().st_size > 10_000
