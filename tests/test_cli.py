"""The ``jaxckpt`` command line on real checkpoint directories written by real Orbax saves.

The tutorial's run: 50 epochs, best val_loss 0.61 at epoch 45, latest 50. Commands run
in-process through ``main([...])`` and, at least once each way, as the installed console
script and as ``python -m jaxckpt``.
"""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import matplotlib.image
import pytest

from jaxckpt import CheckpointManager, CheckpointPolicy, cli
from jaxckpt.cli import main, parse_bytes, plan_prune
from jaxckpt.policy import Record
from _util import TUTORIAL_LOSSES, init_state, train_step

def run_tutorial(directory, keep_best=1, keep_latest=1):
    """50 epochs of real Adam updates, saved with the tutorial's metrics."""
    policy = CheckpointPolicy(monitor="val_loss", mode="min", keep_best=keep_best,
                              keep_latest=keep_latest)
    state = init_state()
    with CheckpointManager(directory, policy) as mngr:
        for epoch, val_loss in enumerate(TUTORIAL_LOSSES, start=1):
            state = train_step(state)
            mngr.save(epoch, state, metrics={"val_loss": val_loss, "loss": val_loss + 0.1},
                      epoch=epoch, data_state={"epoch": epoch})


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """Best 45, latest 50 (keep_best=1, keep_latest=1). Never modified by a test."""
    d = tmp_path_factory.mktemp("tutorial")
    run_tutorial(d)
    return d


@pytest.fixture(scope="module")
def wide_template(tmp_path_factory):
    """keep_best=3, keep_latest=3: steps 45, 46, 47 (best) and 48, 49, 50 (latest)."""
    d = tmp_path_factory.mktemp("wide")
    run_tutorial(d, keep_best=3, keep_latest=3)
    return d


@pytest.fixture
def wide(wide_template, tmp_path):
    """A private copy of ``wide_template`` for a test that prunes it."""
    return shutil.copytree(wide_template, tmp_path / "checkpoints")


def step_dirs(d) -> list[int]:
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def snapshot(d) -> dict:
    """Every path under ``d`` with its size and mtime: any write shows up."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), d)] = (st.st_size, st.st_mtime_ns)
    return out


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxckpt: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- ls ---------------------------------------------------------------------------------


def test_ls_plain_text_when_piped(tutorial, capsys):
    assert main(["ls", str(tutorial)]) == 0
    out = capsys.readouterr().out
    title, header, _, row45, row50 = out.strip().splitlines()
    assert "2 checkpoints, monitor val_loss (min), best 45, latest 50" in title
    assert header.split()[:4] == ["step", "epoch", "val_loss", "loss"]
    assert header.split()[4:] == ["kept", "as", "size", "written", "integrity"]
    assert row45.split()[:6] == ["45", "45", "0.61", "0.71", "best", "#1"]
    assert row45.split()[-3:] == ["ok", "<-", "best"]
    assert row50.split()[:5] == ["50", "50", "0.629", "0.729", "latest"]
    assert row50.split()[-3:] == ["ok", "<-", "latest"]
    assert "\x1b[" not in out  # no colour codes in a pipe


def test_ls_json(tutorial, capsys):
    assert main(["ls", str(tutorial), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["monitor"], data["mode"], data["best_step"], data["latest_step"]) == (
        "val_loss", "min", 45, 50)
    # stable paths for outside tools (Lightning's best_model_path): real step directories
    assert (data["best_path"], data["latest_path"]) == (str(tutorial / "45"),
                                                        str(tutorial / "50"))
    assert os.path.isdir(data["best_path"]) and os.path.isdir(data["latest_path"])
    best, latest = data["checkpoints"]
    assert best["path"] == data["best_path"]
    assert best["step"] == 45 and best["epoch"] == 45 and best["best"] and not best["latest"]
    assert best["metrics"] == {"val_loss": 0.61, "loss": pytest.approx(0.71)}
    assert best["kept"] == ["best #1"] and latest["kept"] == ["latest"]
    assert latest["step"] == 50 and latest["latest"] and not latest["best"]
    for row in data["checkpoints"]:
        assert row["bytes"] == dir_bytes(tutorial / str(row["step"])) > 0
        assert row["integrity"] == "ok" and row["problems"] == []
        assert row["written"].startswith("20") and row["time"] > 0


def test_ls_ranked_by_another_metric_keeps_the_directory_s_keep_counts(wide_template, capsys):
    """--monitor re-ranks by another recorded metric; keep_best/keep_latest stay the
    directory's (3 and 3), so every checkpoint still shows why it is kept."""
    assert main(["ls", str(wide_template), "--monitor", "loss", "--mode", "min", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["monitor"], data["mode"], data["best_step"]) == ("loss", "min", 45)
    kept = {row["step"]: row["kept"] for row in data["checkpoints"]}
    assert kept == {45: ["best #1"], 46: ["best #2"], 47: ["best #3"], 48: ["latest #3"],
                    49: ["latest #2"], 50: ["latest"]}
    assert main(["ls", str(wide_template), "--monitor", "val_los", "--mode", "min"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"jaxckpt: error: --monitor 'val_los' was never recorded in {wide_template}; its "
        "metrics are ['loss', 'val_loss'].")


def test_ls_quick_checks_sizes_only(tutorial, capsys):
    assert main(["ls", str(tutorial), "--quick", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["checksums"] is False
    assert [r["integrity"] for r in data["checkpoints"]] == ["ok (sizes)", "ok (sizes)"]


def test_ls_rich_table_on_a_terminal(tutorial, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "150")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["ls", str(tutorial)]) == 0
    out = capsys.readouterr().out
    assert "─" in out and "best #1" in out and "latest" in out


# -- best -------------------------------------------------------------------------------


def test_best(tutorial, capsys):
    assert main(["best", str(tutorial), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["step"] == 45 and data["epoch"] == 45
    assert data["metrics"] == {"val_loss": 0.61, "loss": pytest.approx(0.71)}
    assert data["path"] == str(tutorial / "45")
    assert main(["best", str(tutorial)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "best checkpoint: step 45 (epoch 45), by val_loss (min)"
    assert out[1].split() == ["val_loss", "0.61"]
    assert out[-1].split() == ["in", str(tutorial / "45")]


def test_best_never_names_a_checkpoint_that_fails_verification(tutorial, tmp_path, capsys):
    """One flipped bit, file size unchanged: ``best`` checks the step it names, as
    ``restore("best")`` does, and names the next best."""
    d = shutil.copytree(tutorial, tmp_path / "ckpt")
    files = [os.path.join(r, f) for r, _, fs in os.walk(d / "45" / "state" / "d") for f in fs]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    assert main(["best", str(d), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 50
    assert "checkpoint 45 in" in captured.err and "corrupt" in captured.err
    assert step_dirs(d) == [45, 50]  # set aside, not deleted: a read-only open moves nothing


# -- verify -----------------------------------------------------------------------------


def test_verify_names_each_bad_checkpoint(tutorial, tmp_path, capsys):
    assert main(["verify", str(tutorial)]) == 0
    assert capsys.readouterr().out.splitlines() == ["step 45: ok", "step 50: ok",
                                                    "2 checkpoint(s) ok"]
    d = shutil.copytree(tutorial, tmp_path / "ckpt")
    state_files = [os.path.join(r, f) for r, _, fs in os.walk(d / "50" / "state") for f in fs]
    with open(max(state_files, key=os.path.getsize), "ab") as f:
        f.write(b"bit rot")
    assert main(["verify", str(d)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == "step 45: ok"
    assert captured.out.splitlines()[1].startswith("step 50: CORRUPT: state/")
    assert one_error_line(captured.err).endswith("failed verification: step(s) 50.")
    assert main(["verify", str(d), "--step", "45"]) == 0
    assert capsys.readouterr().out.splitlines() == ["step 45: ok", "1 checkpoint(s) ok"]
    assert main(["verify", str(d), "--step", "50"]) == 1
    capsys.readouterr()
    # ls reports the bad one (set aside by the manager: 45 is now best and latest).
    assert main(["ls", str(d), "--json"]) == 0
    rows = {r["step"]: r for r in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert rows[45]["best"] and rows[45]["latest"] and rows[45]["integrity"] == "ok"
    assert rows[50]["integrity"] == "corrupt" and rows[50]["kept"] == ["set aside: corrupt"]
    assert rows[50]["problems"][0].startswith("state/")
    assert main(["ls", str(d)]) == 0
    captured = capsys.readouterr()
    assert "1 CORRUPT" in captured.out and "step 50 is corrupt: state/" in captured.out
    assert captured.err == ""
    # best and plot warn on stderr; prune leaves the corrupt one alone.
    assert main(["best", str(d), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 45
    assert "jaxckpt: warning: checkpoint 50 in" in captured.err
    assert main(["plot", str(d), "-o", str(tmp_path / "p.png")]) == 0
    assert "best 45, latest 45" in capsys.readouterr().out
    assert main(["prune", str(d), "--keep-best", "1", "--keep-latest", "1"]) == 0
    assert "left alone  step 50: corrupt" in capsys.readouterr().out
    assert step_dirs(d) == [45, 50]


def test_verify_reports_a_step_it_cannot_read_and_goes_on(tutorial, capsys, monkeypatch):
    from jaxckpt import orbax_io

    real = orbax_io.restore_state

    def restore_state(step_dir, *args, **kwargs):
        if step_dir.name == "45":  # as Orbax's read of a leaf type it cannot restore
            raise ValueError("Unsupported type: <class 'complex'>")
        return real(step_dir, *args, **kwargs)
    monkeypatch.setattr(orbax_io, "restore_state", restore_state)
    assert main(["verify", str(tutorial)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("step 45: CORRUPT: state: could not be read (ValueError: Unsupported "
                      "type: <class 'complex'>)")
    assert out[1] == "step 50: ok"


def test_verify_unknown_step(tutorial, capsys):
    assert main(["verify", str(tutorial), "--step", "7"]) == 2
    assert "no checkpoint for step 7" in one_error_line(capsys.readouterr().err)


# -- plot -------------------------------------------------------------------------------


def test_plot_writes_a_readable_png(tutorial, tmp_path, capsys):
    out_png = tmp_path / "curves.png"
    assert main(["plot", str(tutorial), "-o", str(out_png)]) == 0
    assert "val_loss, loss over 50 steps; best 45, latest 50" in capsys.readouterr().out
    image = matplotlib.image.imread(out_png)
    height, width = image.shape[:2]
    assert 800 <= width <= 2000 and 400 <= height <= 1500
    assert image.std() > 0.05  # not a blank canvas
    two = tmp_path / "two.png"
    assert main(["plot", str(tutorial), "-o", str(two), "--metric", "loss"]) == 0
    assert matplotlib.image.imread(two).shape[1] == width


def test_plot_unknown_metric_lists_the_known_ones(tutorial, tmp_path, capsys):
    assert main(["plot", str(tutorial), "-o", str(tmp_path / "x.png"), "--metric", "acc"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no metric 'acc'" in line and "metrics: val_loss, loss" in line
    assert not (tmp_path / "x.png").exists()


# -- prune ------------------------------------------------------------------------------


def test_prune_dry_run_explains_and_deletes_nothing(wide, capsys):
    before = snapshot(wide)
    assert main(["prune", str(wide), "--keep-best", "1", "--keep-latest", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert snapshot(wide) == before
    decisions = {int(line.split("step")[1].split()[0]): line for line in out.splitlines()
                 if line.startswith("  would")}
    assert sorted(decisions) == [45, 46, 47, 48, 49, 50]
    assert decisions[45].split()[:2] == ["would", "keep"] and "best #1" in decisions[45]
    assert decisions[50].split()[:2] == ["would", "keep"] and "latest" in decisions[50]
    for step, rank in ((46, 2), (47, 3), (48, 4), (49, 5)):
        assert decisions[step].split()[:2] == ["would", "delete"]
        assert f"not among the best 1 by val_loss (ranks #{rank}" in decisions[step]
        assert "not among the latest 1" in decisions[step]
    assert "would delete 4 of 6 checkpoint(s)" in out


def test_ls_and_verify_name_what_is_named_like_a_step_but_ignored(tutorial, tmp_path,
                                                                   capsys):
    d = shutil.copytree(tutorial, tmp_path / "c")
    (d / "7").mkdir()
    (d / "8").write_text("notes")
    assert main(["ls", str(d)]) == 0
    out = capsys.readouterr().out
    assert "2 checkpoints" in out
    assert "ignored: 7 is not a checkpoint (" in out
    assert "ignored: 8 is not a checkpoint (a file, not a checkpoint directory; jaxckpt " \
           "leaves it alone)" in out
    assert main(["ls", str(d), "--json"]) == 0
    assert [i["step"] for i in json.loads(capsys.readouterr().out)["ignored"]] == [7, 8]
    assert main(["verify", str(d)]) == 0
    assert "ignored: 8 is not a checkpoint" in capsys.readouterr().out
    assert (d / "7").is_dir() and (d / "8").read_text() == "notes"


def test_ls_names_a_writer_s_unfinished_save_and_deletion_until_a_writer_removes_them(
        tutorial, tmp_path, capsys):
    """A killed writer's Orbax temp step and half-removed checkpoint got no line in ls."""
    d = shutil.copytree(tutorial, tmp_path / "c")
    (d / "9.orbax-checkpoint-tmp-1733300000000000" / "state").mkdir(parents=True)
    (d / ".jaxckpt-deleting-3-0123abcd").mkdir()
    assert main(["ls", str(d)]) == 0
    out = capsys.readouterr().out
    assert "2 checkpoints" in out
    assert ("ignored: 9.orbax-checkpoint-tmp-1733300000000000 is not a checkpoint (a save "
            "not finished: in progress, or left by a killed writer; the next writing open "
            "removes it)") in out
    assert "ignored: .jaxckpt-deleting-3-0123abcd is not a checkpoint (a deletion" in out
    assert main(["ls", str(d), "--json"]) == 0
    ignored = json.loads(capsys.readouterr().out)["ignored"]
    assert [(i["step"], i["name"][:2]) for i in ignored] == [(3, ".j"), (9, "9.")]
    assert (d / ".jaxckpt-deleting-3-0123abcd").is_dir()  # a reader removes nothing
    CheckpointManager(d).close()
    assert main(["ls", str(d)]) == 0
    assert "ignored" not in capsys.readouterr().out


def test_prune_says_a_step_saved_without_metrics_has_none(tmp_path, capsys):
    policy = CheckpointPolicy(monitor="val_loss", keep_best=1, keep_latest=3)
    with CheckpointManager(tmp_path, policy) as m:
        m.save(1, {"x": jnp.ones(2)}, metrics={"val_loss": 0.5})
        m.save(2, {"x": jnp.ones(2)})  # mid-epoch, no metrics
        m.save(3, {"x": jnp.ones(2)}, metrics={"val_loss": float("nan")})
        m.save(4, {"x": jnp.ones(2)}, metrics={"val_loss": 0.7})
    assert main(["prune", str(tmp_path), "--keep-best", "1", "--keep-latest", "1",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "step 2" in out and "(saved without val_loss)" in out
    assert "(no finite val_loss)" in out  # step 3's NaN


def test_prune_deletes_through_the_manager(wide, capsys):
    assert main(["prune", str(wide), "--keep-best", "2", "--keep-latest", "1"]) == 0
    out = capsys.readouterr().out
    assert "deleted 3 of 6 checkpoint(s)" in out
    assert step_dirs(wide) == [45, 46, 50]
    with CheckpointManager(wide, read_only=True) as mngr:
        assert (mngr.best_step(), mngr.latest_step(), mngr.steps()) == (45, 50, [45, 46, 50])
        assert [h["step"] for h in mngr.history()] == list(range(1, 51))  # history stays
        assert int(mngr.restore("best", target=init_state()).step) == 45
        assert mngr.verify() == {45: [], 46: [], 50: []}


def test_prune_max_bytes_keeps_the_most_valuable_that_fit(wide, capsys):
    budget = dir_bytes(wide / "45") + dir_bytes(wide / "50")  # best #1 and latest #1, exactly
    args = ["prune", str(wide), "--keep-best", "2", "--keep-latest", "2",
            "--max-bytes", str(budget)]
    assert main(args + ["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    over = [line for line in lines if "over the --max-bytes budget" in line]
    assert [int(line.split("step")[1].split()[0]) for line in over] == [46, 49]
    assert "best #2, but over" in over[0] and "latest #2, but over" in over[1]
    assert main(args) == 0
    assert step_dirs(wide) == [45, 50]


def test_prune_says_so_when_it_deletes_the_best(wide, capsys):
    assert main(["prune", str(wide), "--keep-best", "0", "--keep-latest", "1"]) == 0
    captured = capsys.readouterr()
    assert ("jaxckpt: warning: step 45 is the best checkpoint (val_loss 0.61) and is being "
            "deleted; the best left is step 50 (val_loss 0.629).") in captured.err
    assert "[THE BEST CHECKPOINT]" in captured.out
    assert step_dirs(wide) == [50]


def test_prune_never_deletes_everything(wide, capsys):
    before = snapshot(wide)
    assert main(["prune", str(wide), "--keep-best", "1", "--keep-latest", "1",
                 "--max-bytes", "100"]) == 2
    assert "nothing was deleted" in one_error_line(capsys.readouterr().err)
    assert snapshot(wide) == before


def test_prune_defaults_to_the_directory_policy(wide, capsys):
    assert main(["prune", str(wide), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--keep-best 3 --keep-latest 3" in out and "would delete 0 of 6" in out


def _plan(values, sizes, keep_best, keep_latest, max_bytes):
    policy = CheckpointPolicy(monitor="val_loss", keep_best=keep_best, keep_latest=keep_latest)
    records = [Record(step, v) for step, v in values.items()]
    return {d["step"]: (d["keep"], d["why"]) for d in
            plan_prune(records, sizes, policy, max_bytes)}


@pytest.mark.parametrize("max_bytes, kept", [
    (None, [1, 2, 4, 5]),  # best 1, 2 (val 0.1, 0.2) and latest 5, 4
    (400, [1, 2, 4, 5]),
    (399, [1, 2, 5]),      # value order 1, 5, 2, 4: latest #2 (step 4) no longer fits
    (250, [1, 5]),
    (150, [1]),            # best #1 alone
    (99, []),
])
def test_plan_prune_value_order(max_bytes, kept):
    values = {1: 0.1, 2: 0.2, 3: 0.9, 4: 0.8, 5: 0.7}
    plan = _plan(values, {s: 100 for s in values}, 2, 2, max_bytes)
    assert [s for s, (keep, _) in plan.items() if keep] == kept


def test_plan_prune_skips_a_big_checkpoint_for_smaller_ones():
    values = {1: 0.1, 2: 0.2, 3: 0.3}
    plan = _plan(values, {1: 100, 2: 100, 3: 500}, 2, 1, 250)  # latest (3) is too big
    assert plan[3] == (False, "latest, but over the --max-bytes budget: 100 B already kept, "
                              "+500 B > 250 B")
    assert plan[1][0] and plan[2][0]


# -- errors and help --------------------------------------------------------------------


@pytest.mark.parametrize("command", [["ls"], ["best"], ["verify"], ["plot", "-o", "x.png"],
                                     ["prune", "--keep-best", "1"]])
@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such directory"),
    (lambda p: (p / "file").write_text("") or p / "file", "is a file"),
    (lambda p: p, "is not a jaxckpt checkpoint directory: no jaxckpt.json and no step "
                  "directories"),
])
def test_bad_directory_is_one_line_error(tmp_path, capsys, command, make, message):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    path = make(tmp_path)
    assert main([command[0], str(path), *command[1:]]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("left", [[], ["jaxckpt.lock"],
                                  ["1.orbax-checkpoint-tmp/", "jaxckpt.lock"]])
def test_a_directory_a_manager_opened_and_committed_nothing_to_lists_no_checkpoints(
        tmp_path, capsys, left):
    # A run killed before its first save leaves its lock; one killed during it, the lock
    # and Orbax's temporary directory (which made ls say "not a jaxckpt checkpoint
    # directory ... pass the directory given to CheckpointManager"); one that saved
    # nothing, nothing.
    for name in left:
        if name.endswith("/"):
            (tmp_path / name / "state").mkdir(parents=True)
        else:
            (tmp_path / name).write_text("{}")
    assert main(["ls", str(tmp_path)]) == 0
    assert "0 checkpoints" in capsys.readouterr().out
    assert sorted(p.name + "/" * p.is_dir() for p in tmp_path.iterdir()) == left


def test_prune_dry_run_leaves_out_a_step_deleted_while_it_is_measured(tmp_path):
    """Beside a live writer a listed step can be gone by the time its size is read."""
    (tmp_path / "2" / "state").mkdir(parents=True)
    (tmp_path / "2" / "state" / "a").write_bytes(b"x" * 10)
    assert cli._sizes(tmp_path, [1, 2]) == {2: 10}


def test_not_a_checkpoint_dir_suggests_the_nested_one(tutorial, tmp_path, capsys):
    shutil.copytree(tutorial, tmp_path / "checkpoints")
    assert main(["best", str(tmp_path)]) == 2
    assert one_error_line(capsys.readouterr().err).endswith(
        f"did you mean {tmp_path / 'checkpoints'}?")


def test_prune_of_a_directory_plain_orbax_wrote_names_the_fix_a_cli_user_can_apply(
        tmp_path, capsys):
    import numpy as np
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path / "orbax") as m:
        for step in (1, 2, 3):
            m.save(step, args=ocp.args.StandardSave({"w": np.full(4, step, np.float32)}))
    before = snapshot(tmp_path / "orbax")
    assert main(["prune", str(tmp_path / "orbax"), "--keep-latest", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "written by plain Orbax" in line and "--dry-run" in line and "--adopt" in line
    assert snapshot(tmp_path / "orbax") == before
    # The advice works as given: --adopt prunes them.
    assert main(["prune", str(tmp_path / "orbax"), "--keep-latest", "1", "--adopt"]) == 0
    assert "deleted 2 of 3 checkpoint(s)" in capsys.readouterr().out
    assert step_dirs(tmp_path / "orbax") == [3]


def test_prune_adopt_keeps_the_best_of_orbax_metrics_by_monitor(tmp_path, capsys):
    import numpy as np
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["val_loss"], best_mode="min")
    with ocp.CheckpointManager(tmp_path / "orbax", options=options) as m:
        for step, loss in ((1, 0.5), (2, 0.2), (3, 0.4), (4, 0.6)):
            m.save(step, args=ocp.args.StandardSave({"w": np.full(4, step, np.float32)}),
                   metrics={"val_loss": loss})
    assert main(["prune", str(tmp_path / "orbax"), "--keep-best", "1", "--keep-latest", "1",
                 "--adopt", "--monitor", "val_loss"]) == 0
    assert step_dirs(tmp_path / "orbax") == [2, 4]


def test_read_only_commands_change_nothing(tutorial, tmp_path, capsys):
    before = snapshot(tutorial)
    for argv in (["ls"], ["ls", "--json"], ["best"], ["best", "--json"], ["verify"],
                 ["plot", "-o", str(tmp_path / "p.png")],
                 ["prune", "--keep-best", "0", "--keep-latest", "1", "--dry-run"]):
        assert main([argv[0], str(tutorial), *argv[1:]]) == 0, (argv, capsys.readouterr())
        out = capsys.readouterr().out
        assert out.strip(), argv  # each command did its work, not an early exit
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert snapshot(tutorial) == before


@pytest.mark.parametrize("command", ["ls", "best", "verify", "plot", "prune", "demo"])
def test_every_command_has_help_with_examples(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: jaxckpt {command}") and "examples:\n  jaxckpt " in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: jaxckpt" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("1000", 1000), ("500MB", 500 * 10**6),
                                            ("1.5GiB", 3 * 2**29), ("2G", 2 * 2**30),
                                            ("64 KiB", 65536)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


# -- the installed command --------------------------------------------------------------


def _script() -> str:
    path = shutil.which("jaxckpt", path=os.path.dirname(sys.executable))
    assert path, "the jaxckpt console script is not installed: pip install -e ."
    return path


def test_console_script_and_python_dash_m(tutorial):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the CLI picks cpu
    ls = subprocess.run([_script(), "ls", str(tutorial)], capture_output=True, text=True,
                        env=env, timeout=120)
    assert ls.returncode == 0, ls.stderr
    assert ls.stderr == ""  # no Orbax/absl chatter
    assert "best #1" in ls.stdout and "\x1b[" not in ls.stdout
    best = subprocess.run([sys.executable, "-m", "jaxckpt", "best", str(tutorial), "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert best.returncode == 0, best.stderr
    assert json.loads(best.stdout)["step"] == 45
    missing = subprocess.run([_script(), "ls", str(tutorial / "nope")], capture_output=True,
                             text=True, env=env, timeout=120)
    assert missing.returncode == 2 and missing.stdout == ""
    assert one_error_line(missing.stderr).endswith("nope: no such directory.")


def test_ls_into_a_pipe_closed_early_stops_quietly(tutorial):
    # `jaxckpt ls DIR | head -1`: the reader is gone before ls writes (here, closed at
    # once, while ls still imports jax). No traceback, no "Broken pipe" error line.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([_script(), "ls", str(tutorial)], stdout=w,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    finally:
        os.close(w)
    assert proc.stderr == ""
    assert proc.returncode == 128 + 13  # as a command killed by SIGPIPE


def test_a_broken_pipe_that_is_not_stdout_is_an_error(tutorial, monkeypatch, capsys):
    # A pipe to something else (a store's connection) broke: that is an error to report,
    # not a reader that went away.
    def ls(args):
        raise BrokenPipeError(32, "Broken pipe (the connection to the store)")

    monkeypatch.setattr(cli, "cmd_ls", ls)
    assert main(["ls", str(tutorial)]) == 2
    assert "the connection to the store" in one_error_line(capsys.readouterr().err)


# -- demo -------------------------------------------------------------------------------


def test_demo_trains_and_leaves_an_inspectable_directory(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--epochs", "1"]) == 0
    assert f"jaxckpt ls {tmp_path / 'checkpoints'}" in capsys.readouterr().out
    assert main(["best", str(tmp_path / "checkpoints"), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["epoch"] == 1 and "val_loss" in best["metrics"]
