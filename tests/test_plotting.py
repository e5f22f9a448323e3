"""Plots people read: epochs on the x axis with integer ticks, the best value labelled inside
the axes, the run's directory in the title, a log scale on request; no backend switching."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import optax
import pytest

import jaxckpt
from jaxckpt import plotting
from _util import MLP

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 5-epoch fit that also saves mid-epoch (every 3 steps)."""
    d = tmp_path_factory.mktemp("run") / "checkpoints"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8, 8, 1)).astype(np.float32)
    y = np.argmax(x.reshape(256, -1)[:, :10], axis=1).astype(np.int32)
    policy = jaxckpt.CheckpointPolicy(monitor="val_loss", keep_latest=2, every_n_steps=3,
                                      every_n_epochs=1)
    h = jaxckpt.Trainer(MLP(), optax.adam(1e-2), quiet=True).fit(
        (x, y), (x[:64], y[:64]), epochs=5, batch_size=64, checkpoint=d, policy=policy)
    return d, h


def drawn(fig):
    """The figure rendered by Agg (what savefig to .png does), so extents are real."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig


def inside(ax, text):
    """Whether a text artist's box lies within the axes (in display coordinates)."""
    renderer = ax.figure.canvas.get_renderer()
    box, frame = text.get_window_extent(renderer), ax.get_window_extent(renderer)
    return frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and \
        box.y1 <= frame.y1


def test_history_plot_epochs_integer_ticks_best_inside_directory_in_title(run):
    directory, h = run
    fig = drawn(plotting.history_figure(h, log_scale=True))
    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_xlabel() == acc_ax.get_xlabel() == "epoch"
    ticks = [t for t in loss_ax.get_xticks() if loss_ax.get_xlim()[0] <= t <= loss_ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert loss_ax.get_yscale() == "log" and acc_ax.get_yscale() == "linear"
    note = next(t for t in loss_ax.texts if t.get_text().startswith("best val_loss"))
    assert f"at epoch {h.best_epoch}" in note.get_text() and inside(loss_ax, note)
    assert str(directory) in fig._suptitle.get_text()


def test_history_plot_writes_a_file(run, tmp_path):
    _, h = run
    h.plot(tmp_path / "h.png", log_scale=True)
    h.plot(tmp_path / "h.svg", metrics=("loss", "val_loss"), title="mine")
    assert (tmp_path / "h.png").stat().st_size > 10_000
    assert "mine" in (tmp_path / "h.svg").read_text()


def test_checkpoint_plot_uses_epochs_too_with_steps_on_a_second_axis(run):
    directory, h = run
    with jaxckpt.CheckpointManager(directory, read_only=True) as m:
        entries, best, latest = m.entries(), m.best_step(), m.latest_step()
    fig = plotting.checkpoints_figure(entries, ["val_loss", "loss"], monitor="val_loss",
                                      mode="min", best=best, latest=latest,
                                      title=str(directory), log_scale=True)
    drawn(fig)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "epoch" and ax.get_yscale() == "log"
    assert any(child.get_xlabel() == "step (4 per epoch)" for child in ax.child_axes)
    note = ax.texts[0]
    assert f"best: epoch {best // 4} (step {best})" in note.get_text() and inside(ax, note)
    assert str(directory) in fig._suptitle.get_text()


def test_plotting_never_switches_the_backend_nor_loads_pyplot(run, tmp_path):
    directory, _ = run
    # The raw rcParams entry: matplotlib.get_backend() would itself load pyplot to resolve it.
    code = ("import sys, matplotlib, jaxckpt\n"
            "backend = lambda: dict.__getitem__(matplotlib.rcParams, 'backend')\n"
            "before = backend()\n"
            f"h = jaxckpt.History(rows=[{{'epoch': 1, 'loss': 1.0}}, {{'epoch': 2, 'loss': 0.5}}],"
            " monitor='loss')\n"
            f"h.plot({str(tmp_path / 'p.png')!r})\n"
            "from jaxckpt.cli import main\n"
            f"assert main(['plot', {str(directory)!r}, '-o', {str(tmp_path / 'c.png')!r}]) == 0\n"
            "assert backend() == before, (before, backend())\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    sources = [p for p in (REPO / "jaxckpt").rglob("*.py")]
    assert not [p for p in sources if "matplotlib.use(" in p.read_text()]
