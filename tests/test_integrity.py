"""Manifests, verification and fallback: real checkpoints, corrupted on disk for real
(truncated, flipped, deleted, garbage JSON, crafted paths), and the no-pickle guarantee."""

import json
import os
import pathlib
import pickle
import re
import shutil
import threading
import warnings
import zlib

import google_crc32c
import xxhash
import jax
import numpy as np
import pytest

import jaxckpt
from jaxckpt import CheckpointManager, CheckpointPolicy, integrity
from _util import init_state, leaves_equal, train_step

# Steps 1-4: step 2 is the best, 3 the next best, 4 the latest.
LOSSES = {1: 0.9, 2: 0.5, 3: 0.6, 4: 0.8}
POLICY = CheckpointPolicy(monitor="val_loss", keep_best=2, keep_latest=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    state, states = init_state(), {}
    with CheckpointManager(d, POLICY) as m:
        for step, loss in LOSSES.items():
            state = train_step(state)
            states[step] = jax.device_get(state)
            m.save(step, state, metrics={"val_loss": loss}, data_state={"batch": step})
    return d, states


@pytest.fixture
def ckpt(saved, tmp_path):
    """A private copy of the saved directory, to corrupt."""
    d, states = saved
    shutil.copytree(d, tmp_path / "c")
    return tmp_path / "c", states


def data_file(step_dir):
    """The largest array data file of a step (Orbax's OCDBT data)."""
    files = [p for p in step_dir.glob("state/**/d/*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def snapshot(step_dir):
    return {str(p.relative_to(step_dir)): p.read_bytes()
            for p in sorted(step_dir.rglob("*")) if p.is_file()}


def flip(path, offset=-20):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def change_digit(path, after):
    """Valid JSON of the same size, one digit changed (a metric 0.7 read as 0.3)."""
    data = bytearray(path.read_bytes())
    i = data.index(after.encode()) + len(after)
    while not chr(data[i]).isdigit() or data[i] == ord("0"):
        i += 1
    data[i] = ord("1") if data[i] != ord("1") else ord("2")
    path.write_bytes(bytes(data))


def rewrite_manifest(step_dir, step):
    """A crafted checkpoint: the manifest matches the (tampered) files again."""
    integrity.write_manifest(step_dir, integrity.build_manifest(step_dir, step))


# -- the manifest ----------------------------------------------------------------------------


def test_manifest_lists_every_file_and_fingerprints_every_array(saved):
    """Version 3: sizes of every file, checksums of the small ones, and a fingerprint of
    each array taken at save time (XXH3-64 of a host array's bytes), so the save reads
    back no array data."""
    d, states = saved
    step_dir = d / "4"
    manifest = json.loads((step_dir / "jaxckpt_manifest.json").read_text())
    assert manifest["format"] == "jaxckpt-manifest/3" and manifest["step"] == 4
    files = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files - {"jaxckpt_manifest.json"}
    assert {"meta/metadata", "data_state/metadata", "_CHECKPOINT_METADATA"} <= files
    assert manifest["algorithm"] == "crc32c"  # google-crc32c's C extension is installed
    for rel, entry in manifest["files"].items():
        data = (step_dir / rel).read_bytes()
        small = len(data) <= integrity.SMALL_FILE
        assert entry == ({"size": len(data), "crc32c": google_crc32c.value(data)} if small
                         else {"size": len(data)}), rel
    leaves = manifest["arrays"]["leaves"]
    saved_leaves = jax.tree_util.tree_flatten_with_path(
        jaxckpt.target.to_saveable(states[4]))[0]
    assert len(leaves) == len(saved_leaves) > 0
    for path, leaf in saved_leaves:
        key = jaxckpt.target.path_str(path)
        assert leaves[key] == {"xxh3_64": xxhash.xxh3_64_intdigest(np.asarray(leaf).tobytes())}, key


def test_crc32_manifests_of_older_writers_verify_and_catch_flipped_bytes(ckpt):
    d, states = ckpt
    step_dir = d / "4"
    integrity.write_manifest(step_dir, integrity.build_manifest(step_dir, 4, None, "crc32"))
    assert json.loads((step_dir / "jaxckpt_manifest.json").read_text())["format"] == \
        "jaxckpt-manifest/1"
    entry = json.loads((step_dir / "jaxckpt_manifest.json").read_text())["files"]["meta/metadata"]
    assert entry["crc32"] == zlib.crc32((step_dir / "meta/metadata").read_bytes())
    with CheckpointManager(d, read_only=True) as m:
        assert m.verify(4) == {4: []}
        assert leaves_equal(m.restore(4, target=init_state()), states[4])
        flip(data_file(step_dir))
        [problem] = m.verify(4)[4]
    assert re.search(r"state/(\S*/)?d/\w+: checksum mismatch \(crc32 0x", problem), problem


@pytest.mark.parametrize("field, value, named", [
    ("algorithm", "xxh3_64", "checksum 'xxh3_64'"),
    ("format", "jaxckpt-manifest/4", "manifest format 'jaxckpt-manifest/4'")])
def test_a_newer_writers_manifest_is_unverified_never_set_aside(ckpt, caplog, field, value,
                                                                named):
    """Version skew is not corruption: an older reader restores the checkpoint (warning
    that it cannot verify it) and its next save moves nothing aside."""
    d, states = ckpt
    manifest_file = d / "4" / "jaxckpt_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest[field] = value
    manifest_file.write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="jaxckpt"), CheckpointManager(d, POLICY) as m:
        assert m.steps() == [2, 3, 4]
        assert m.verify(4, strict=True) == {4: [m.verdicts()[4].describe()]}
        assert not m.verdicts()[4].has_manifest and m.verdicts()[4].ok
        with pytest.warns(UserWarning, match="checkpoint 4 .* restoring it unverified"):
            assert leaves_equal(m.restore("latest", target=init_state()), states[4])
        m.save(5, init_state(), metrics={"val_loss": 0.9})
        assert m.steps() == [2, 3, 5]  # 4 went as any latest does, by the policy
    assert not (d / "jaxckpt-corrupt").exists()
    assert any(named in r.getMessage() and "Upgrade jaxckpt" in r.getMessage()
               for r in caplog.records)


def test_a_manifest_naming_no_real_checksum_is_corrupt(ckpt):
    d, _ = ckpt
    manifest_file = d / "4" / "jaxckpt_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["algorithm"] = ["crc32"]
    manifest_file.write_text(json.dumps(manifest))
    with open_read_only(d, corrupt_at_open=True) as m:
        assert m.verify(4)[4][0] == "jaxckpt_manifest.json: unknown checksum algorithm ['crc32']"


def test_manifest_is_computed_in_the_background_after_commit(tmp_path, monkeypatch):
    seen = []
    original = integrity.build_manifest

    def recording(step_dir, step, arrays=None):
        seen.append((threading.current_thread().name, (step_dir / "commit_success.txt").exists()))
        return original(step_dir, step, arrays)

    monkeypatch.setattr(integrity, "build_manifest", recording)
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=2)) as m:
        m.save(1, {"x": np.arange(4.0)})
        m.save(2, {"x": np.arange(4.0)})
    assert [name.startswith("jaxckpt") for name, _ in seen] == [True, True]  # the worker
    assert all(committed for _, committed in seen)  # after Orbax's commit
    with CheckpointManager(tmp_path, read_only=True) as m:
        assert m.verify() == {1: [], 2: []}


def test_later_saves_leave_earlier_manifests_valid(saved):
    d, _ = saved
    with CheckpointManager(d, read_only=True) as m:
        assert m.steps() == [2, 3, 4]
        assert m.verify() == {2: [], 3: [], 4: []}
        assert m.verify(checksums=False, strict=True) == {2: [], 3: [], 4: []}


# -- each corruption is named, restore refuses it, "latest" falls back ------------------------

HOLDS = (r" \[(holds arrays: state/step, state/params/dense/bias, state/params/dense/kernel, "
         r"\S+, .* and \d+ more|part of ocdbt\.process_0's own index, which a restore does "
         r"not read)\]")
CORRUPTIONS = {
    # name: (how to corrupt the step dir, what verify must say, found by sizes alone?)
    # A data file's problem names what it holds: the arrays a restore reads from it, or
    # that it is part of Orbax's per-process index, which a restore does not read (the
    # largest file here may be either: the item's B+tree node or the process's copy).
    "truncated data file": (lambda s: os.truncate(data_file(s), data_file(s).stat().st_size // 2),
                            r"state/(\S*/)?d/\w+: size \d+ bytes, manifest says \d+" + HOLDS, True),
    "flipped bytes in data file": (lambda s: flip(data_file(s)),
                                   r"state/(\S*/)?d/\w+: checksum mismatch \(crc32c 0x\w+, "
                                   r"manifest says 0x\w+\)" + HOLDS, False),
    "deleted data file": (lambda s: data_file(s).unlink(),
                          r"state/(\S*/)?d/\w+: missing" + HOLDS, True),
    "flipped byte in Orbax metadata": (lambda s: flip(s / "_CHECKPOINT_METADATA", 5),
                                       r"_CHECKPOINT_METADATA: checksum mismatch", False),
    "garbage manifest": (lambda s: (s / "jaxckpt_manifest.json").write_text("{\"files\": [1,"),
                         r"jaxckpt_manifest.json: not JSON", True),
    "manifest of wrong schema": (
        lambda s: (s / "jaxckpt_manifest.json").write_text(json.dumps(
            {"format": "jaxckpt-manifest/1", "step": 4, "algorithm": "crc32", "files": []})),
        r"jaxckpt_manifest.json: 'files' must be a non-empty object", True),
    "manifest of another step": (
        lambda s: (s / "jaxckpt_manifest.json").write_text(
            (s / "jaxckpt_manifest.json").read_text().replace('"step": 4', '"step": 3')),
        r"jaxckpt_manifest.json: step is 3, expected 4", True),
    "garbage meta JSON": (lambda s: (s / "meta" / "metadata").write_text("{'not': json"),
                          r"meta/metadata: not readable JSON", True),
    "meta of wrong schema (manifest rewritten)": (
        lambda s: ((s / "meta" / "metadata").write_text(json.dumps(
            {"format": "jaxckpt/1", "step": "4", "metrics": {"val_loss": "low"}})),
            rewrite_manifest(s, 4)),
        r"meta/metadata: step is '4', expected 4.*meta/metadata: metrics \['val_loss'\] are "
        r"not numbers", True),
    # Read at every open to rank the step: compared with the manifest then, not at a
    # verify only (a forged best value made a writer delete a good checkpoint).
    "changed metric in meta JSON": (lambda s: change_digit(s / "meta" / "metadata", "val_loss"),
                                    r"meta/metadata: checksum mismatch", True),
    "changed number in data_state JSON": (
        lambda s: change_digit(s / "data_state" / "metadata", "batch"),
        r"data_state/metadata: checksum mismatch", True),
    "garbage data_state": (lambda s: (s / "data_state" / "metadata").write_bytes(b"\xff\xfe"),
                           r"data_state/metadata: not readable JSON", True),
    "data_state of wrong schema (manifest rewritten)": (
        lambda s: ((s / "data_state" / "metadata").write_text('{"__bytes_b64__": "%%%"}'),
                   rewrite_manifest(s, 4)),
        r"data_state/metadata: '__bytes_b64__' is not base64", True),
}


def open_read_only(d, corrupt_at_open):
    """Open ``d``: a manager checks sizes, so some corruptions are found (and warned) here."""
    if not corrupt_at_open:
        return CheckpointManager(d, read_only=True)
    with pytest.warns(UserWarning, match=r"checkpoint 4 .* is corrupt .*set aside"):
        return CheckpointManager(d, read_only=True)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_latest_is_named_refused_and_skipped(ckpt, name):
    d, states = ckpt
    corrupt, problem, by_size = CORRUPTIONS[name]
    corrupt(d / "4")
    before = snapshot(d / "4")
    with open_read_only(d, by_size) as m:
        report = m.verify()
        assert set(report) == {2, 3, 4} and report[2] == report[3] == []
        assert re.search(problem, "; ".join(report[4]), re.S), report[4]
    with open_read_only(d, by_size) as m:
        assert (4 not in m.steps()) == by_size
        with pytest.raises(jaxckpt.CheckpointCorruptError, match=r"checkpoint 4 .* corrupt") as e:
            m.restore(4)
        assert re.search(problem, str(e.value), re.S)
        assert m.steps() == [2, 3] and m.best_step() == 2
    with open_read_only(d, by_size) as m:
        with pytest.warns(UserWarning, match=r"skipped corrupt checkpoint\(s\) \[4\].*step 3"):
            latest = m.restore_checkpoint("latest", target=init_state())
        assert latest.step == 3 and latest.data_state == {"batch": 3}
        assert leaves_equal(latest.state, states[3])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a step asked for by number skipped nothing
            assert leaves_equal(m.restore(3, target=init_state()), states[3])
    assert snapshot(d / "4") == before  # never modified, never deleted


def test_a_forged_best_metric_does_not_make_a_writer_delete_a_good_checkpoint(tmp_path):
    policy = CheckpointPolicy(monitor="val_loss", keep_best=2, keep_latest=1)
    with CheckpointManager(tmp_path, policy) as m:
        for step, loss in zip((1, 2, 3, 4), (0.5, 0.4, 0.45, 0.7)):
            m.save(step, {"w": np.full(8, step, np.float32)}, metrics={"val_loss": loss})
    change_digit(tmp_path / "4" / "meta" / "metadata", "val_loss")  # 0.7 -> 0.1: best
    with pytest.warns(UserWarning, match=r"checkpoint 4 .* is corrupt"):
        m = CheckpointManager(tmp_path)
    with m:
        m.save(5, {"w": np.zeros(8, np.float32)}, metrics={"val_loss": 0.6})
        assert m.steps() == [2, 3, 5] and m.best_step() == 2
    assert [p.name.split("-")[0] for p in (tmp_path / "jaxckpt-corrupt").iterdir()] == ["4"]


def small_data_files(step_dir):
    return sorted(p for p in step_dir.glob("state/**/d/*")
                  if p.is_file() and p.stat().st_size <= integrity.SMALL_FILE)


def test_a_damaged_small_data_file_names_the_arrays_it_holds(ckpt):
    """A small data file is checked by its checksum, and its name is a random id: the
    report also names the arrays it holds, read from Orbax's OCDBT index. The item's own
    index (state/d/: the B+tree a restore reads, the small arrays inline) holds them all."""
    d, _ = ckpt
    [index] = [p for p in small_data_files(d / "4") if p.parent == d / "4" / "state" / "d"]
    flip(index)
    with CheckpointManager(d, read_only=True) as m:
        [problem] = m.verify(4)[4]
    rel = index.relative_to(d / "4").as_posix()
    assert problem.startswith(f"{rel}: checksum mismatch (crc32c 0x"), problem
    assert re.search(r"\) \[holds arrays: state/\S+, .*state/params/dense/kernel, .* and \d+ "
                     r"more\]$", problem), problem
    os.truncate(index, 10)  # found by sizes alone, named the same way
    with pytest.warns(UserWarning, match=r"checkpoint 4 .* is corrupt"), \
            CheckpointManager(d, read_only=True) as m:
        [problem] = m.verify(4)[4]
    assert problem.startswith(f"{rel}: size 10 bytes, manifest says ")
    assert "state/params/dense/kernel" in problem, problem


def test_every_damaged_small_data_file_is_explained(ckpt):
    """Each small data file either holds arrays a restore reads (named), or is part of a
    process's own OCDBT index (Orbax's per-process writes, merged into the item's), which
    a restore does not read."""
    d, _ = ckpt
    files = small_data_files(d / "4")
    assert len(files) > 1
    for path in files:
        original = path.read_bytes()
        flip(path)
        with CheckpointManager(d, read_only=True) as m:
            [problem] = m.verify(4)[4]
        path.write_bytes(original)
        rel = path.relative_to(d / "4").as_posix()
        assert problem.startswith(f"{rel}: checksum mismatch"), problem
        assert re.search(r"\[holds arrays?: state/|\[part of ocdbt\.process_0's own index",
                         problem), problem


def test_a_small_array_in_a_data_file_of_its_own_is_named(tmp_path):
    """Arrays above OCDBT's inline limit (1 KiB) are stored in data files, small ones in
    small files: a flipped byte in one is reported with the array it hits."""
    state = {"params": {"a": np.arange(1000, dtype=np.float32),
                        "b": np.arange(2000, dtype=np.float32) * 2}}
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=1)) as m:
        m.save(1, state)
    head = state["params"]["a"].tobytes()[:64]
    [data] = [p for p in small_data_files(tmp_path / "1") if head in p.read_bytes()]
    raw = bytearray(data.read_bytes())
    raw[raw.find(head) + 2000] ^= 0x01
    data.write_bytes(bytes(raw))
    with CheckpointManager(tmp_path, read_only=True) as m:
        [problem] = m.verify(1)[1]
    assert re.search(r": checksum mismatch \(crc32c 0x\w+, manifest says 0x\w+\) \[holds "
                     r"arrays?: (\S+, )?state/params/a\b", problem), problem


def test_corrupt_best_is_never_best_and_never_deleted(ckpt):
    d, states = ckpt
    flip(data_file(d / "2"))
    before = snapshot(d / "2")
    with CheckpointManager(d, POLICY) as m:
        assert m.best_step() == 2  # a flipped byte is invisible to sizes
        with pytest.warns(UserWarning, match=r"skipped corrupt checkpoint\(s\) \[2\].*step 3, "
                                             r"the best checkpoint that verifies"):
            best = m.restore("best", target=init_state())
        assert leaves_equal(best, states[3])
        assert (m.best_step(), m.steps()) == (3, [3, 4])
        # Steps 5-7 are worse than 0.5: with 2 corrupt, they may join the best-2.
        with pytest.warns(UserWarning, match=r"moved corrupt checkpoint 2 .*not deleted") as w:
            m.save(5, init_state(), metrics={"val_loss": 0.55})
        assert [x.filename for x in w if "moved" in str(x.message)] == [__file__]  # the caller
        m.save(6, init_state(), metrics={"val_loss": 0.7})
        m.save(7, init_state(), metrics={"val_loss": 0.65})
        assert (m.best_step(), m.steps()) == (5, [3, 5, 7])
    moved = list((d / "jaxckpt-corrupt").iterdir())
    assert [p.name.split("-")[0] for p in moved] == ["2"]
    assert snapshot(moved[0]) == before
    with CheckpointManager(d, read_only=True) as m:  # a new process knows nothing else
        assert (m.best_step(), m.steps()) == (5, [3, 5, 7])
        assert m.verify() == {3: [], 5: [], 7: []}


def test_a_damaged_small_file_of_the_best_never_costs_the_runner_up(ckpt):
    """A flipped byte in the best's state/_METADATA passes the open's size check. The
    first save that deletes what it replaced compares the kept steps' checksums first:
    before, step 2 stayed best #1 and step 3 (best #2, what restore('best') falls back to)
    was deleted for a new step that ranked between them."""
    d, _ = ckpt
    flip(d / "2" / "state" / "_METADATA", offset=len((d / "2" / "state" / "_METADATA")
                                                      .read_bytes()) // 2)
    before = snapshot(d / "2")
    with CheckpointManager(d, POLICY) as m:
        assert m.best_step() == 2  # invisible to sizes
        with pytest.warns(UserWarning, match=r"(?s)checkpoint 2 .*_METADATA"):
            m.save(5, init_state(), metrics={"val_loss": 0.55})
        m.wait()
        assert (m.best_step(), m.steps()) == (5, [3, 5])
    assert sorted(p.name for p in d.iterdir() if p.name.isdigit()) == ["2", "3", "5"]
    assert snapshot(d / "2") == before  # set aside, not deleted (moved by the next save)


def test_resumed_run_saves_over_the_steps_of_a_corrupt_checkpoint(ckpt):
    """Resume falls back from corrupt 4 to 3, redoes step 4 and saves it again."""
    d, states = ckpt
    os.truncate(data_file(d / "4"), 10)
    with pytest.warns(UserWarning, match=r"checkpoint 4 .* corrupt .*set aside"):
        m = CheckpointManager(d, POLICY)
    with m:
        assert m.latest_step() == 3
        with pytest.warns(UserWarning, match=r"skipped corrupt checkpoint\(s\) \[4\].*step 3"):
            resumed = m.restore("latest", target=init_state())
        again = train_step(resumed)
        with pytest.warns(UserWarning, match=r"moved corrupt checkpoint 4 .*/jaxckpt-corrupt/4-"):
            m.save(4, again, metrics={"val_loss": 0.8})
        assert m.steps() == [2, 3, 4]
    with CheckpointManager(d, read_only=True) as m:
        assert m.verify() == {2: [], 3: [], 4: []}
        assert leaves_equal(m.restore(4, target=init_state()), states[4])  # bit for bit


def test_every_checkpoint_corrupt(ckpt):
    d, _ = ckpt
    for step in (2, 3, 4):
        flip(data_file(d / str(step)))
    with CheckpointManager(d, read_only=True) as m:
        with pytest.raises(jaxckpt.CheckpointCorruptError) as e:
            m.restore("latest")
    msg = str(e.value)
    assert all(f"step {s}: state/" in msg for s in (2, 3, 4)) and "None was modified" in msg


# Leaves of every size a restore treats apart: read as numpy and checked before they are
# copied into place (up to a few MiB), or placed by Orbax and checked where they are; two
# of each, so that each kind is checked on threads of their own.
ARRAYS = {"small": 1_000, "medium": 700_000, "medium2": 600_000, "large": 1_500_000,
          "large2": 1_200_000}  # float32: 4 KB, 2.7, 2.3, 5.7, 4.6 MiB


def array_state(seed):
    keys = jax.random.split(jax.random.key(seed), len(ARRAYS))
    return {name: jax.random.normal(k, (n,)) for k, (name, n) in zip(keys, ARRAYS.items())}


@pytest.mark.parametrize("leaf", list(ARRAYS))
def test_a_flipped_byte_in_any_array_is_named_and_skipped(tmp_path, leaf):
    """Array data is covered by fingerprints, not file checksums: the arrays read are
    compared with them. The flipped byte is found whichever way the array is placed,
    named by its leaf, and restore('latest') falls back to step 1."""
    states = {step: array_state(step) for step in (1, 2)}
    with CheckpointManager(tmp_path, CheckpointPolicy(keep_latest=2)) as m:
        for step, state in states.items():
            m.save(step, state)
    head = np.asarray(states[2][leaf]).tobytes()[:64]
    data = next(p for p in (tmp_path / "2").glob("state/**/d/*") if head in p.read_bytes())
    raw = bytearray(data.read_bytes())
    raw[raw.find(head) + 4 * ARRAYS[leaf] // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    # Orbax sometimes writes a small array into a data file of its own, which then has a
    # checksum of its own: the manifest is sealed again over the changed file (same
    # fingerprints), so that only the fingerprint can find the flipped byte.
    manifest = json.loads((tmp_path / "2" / integrity.MANIFEST_FILE).read_text())
    resealed = integrity.build_manifest(tmp_path / "2", 2, {
        k: v for k, v in manifest["arrays"].items() if k != "item"})
    assert resealed["arrays"] == manifest["arrays"]
    integrity.write_manifest(tmp_path / "2", resealed)
    problem = rf"state/{leaf}: array data does not match its fingerprint \(xxh3_64 0x[0-9a-f]{{16}}, manifest says 0x[0-9a-f]{{16}}\)"
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          states[1])
    with CheckpointManager(tmp_path, read_only=True) as m:
        report = m.verify()
        assert report[1] == [] and len(report[2]) == 1 and re.search(problem, report[2][0])
    with CheckpointManager(tmp_path, read_only=True) as m:
        with pytest.raises(jaxckpt.CheckpointCorruptError, match=problem):
            m.restore(2, target=target)
        with pytest.warns(UserWarning, match=r"skipped corrupt checkpoint\(s\) \[2\]"):
            latest = m.restore_checkpoint("latest", target=target)
        assert latest.step == 1 and leaves_equal(latest.state, states[1])


def test_missing_manifest_is_unverified_but_usable(ckpt):
    """What a writer killed between Orbax's commit and the manifest leaves behind."""
    d, states = ckpt
    (d / "4" / "jaxckpt_manifest.json").unlink()
    with CheckpointManager(d, read_only=True) as m:
        assert m.steps() == [2, 3, 4]
        with pytest.warns(UserWarning, match=r"\[4\] .* no manifest: unverified but usable"):
            assert m.verify() == {2: [], 3: [], 4: []}
        assert m.verify(4, strict=True) == {4: [m.verdicts()[4].describe()]}
        assert not m.verdicts()[4].has_manifest and m.verdicts()[4].ok
        with pytest.warns(UserWarning, match="checkpoint 4 .* no manifest .* unverified"):
            assert leaves_equal(m.restore("latest", target=init_state()), states[4])


def test_verify_unknown_step(saved):
    d, _ = saved
    with CheckpointManager(d, read_only=True) as m:
        with pytest.raises(jaxckpt.CheckpointNotFoundError, match=r"step 9.*\[2, 3, 4\]"):
            m.verify(9)


# -- paths in a manifest never lead outside the checkpoint -------------------------------------


@pytest.mark.parametrize("path, why", [
    ("../../jaxckpt.json", "'..'"),
    ("/etc/passwd", "an absolute path"),
    ("state/../../../x", "'..'"),
    ("state//d", "empty components"),
    ("state\\..\\x", "not a plain POSIX path"),
    ("C:/x", "not a plain POSIX path"),
    ("", "not a non-empty string"),
])
def test_manifest_paths_outside_the_checkpoint_are_rejected(ckpt, path, why):
    d, _ = ckpt
    manifest_file = d / "4" / "jaxckpt_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["files"][path] = {"size": 1, manifest["algorithm"]: 0}
    manifest_file.write_text(json.dumps(manifest))
    with open_read_only(d, corrupt_at_open=True) as m:
        problems = m.verify(4)[4]
    assert any(why in p and "outside the checkpoint directory" in p for p in problems), problems


def test_symlink_out_of_the_checkpoint_is_rejected(ckpt, tmp_path):
    d, _ = ckpt
    target = data_file(d / "4")
    outside = tmp_path / "outside"
    outside.write_bytes(target.read_bytes())  # same size and checksum
    target.unlink()
    target.symlink_to(outside)
    with open_read_only(d, corrupt_at_open=True) as m:
        problems = m.verify(4)[4]
    assert problems == [f"{target.relative_to(d / '4')}: leads outside the checkpoint "
                        "directory (a symlink)"]


@pytest.mark.parametrize("meta, problem", [
    ({"format": "jaxckpt/1", "step": 4}, None),
    ({"format": "jaxckpt/1", "step": 4, "epoch": 2, "metrics": {"a": 1, "b": float("nan")},
      "time": 1.5, "reason": "due", "future_field": [1]}, None),
    ([], "not a JSON object"),
    ({"format": "pickle", "step": 4}, "format is 'pickle'"),
    ({"format": "jaxckpt/1", "step": 5}, "step is 5, expected 4"),
    ({"format": "jaxckpt/1", "step": True}, "step is True"),
    ({"format": "jaxckpt/1", "step": 4, "epoch": 1.5}, "epoch must be an int"),
    ({"format": "jaxckpt/1", "step": 4, "metrics": [1]}, "metrics must be an object"),
    ({"format": "jaxckpt/1", "step": 4, "metrics": {"a": True}}, r"metrics \['a'\]"),
    ({"format": "jaxckpt/1", "step": 4, "time": "now"}, "time must be a number"),
    ({"format": "jaxckpt/1", "step": 4, "reason": 3}, "reason must be a string"),
])
def test_meta_schema(meta, problem):
    problems = jaxckpt.format.validate_meta(meta, 4)
    if problem is None:
        assert problems == []
    else:
        assert any(re.search(problem, p) for p in problems), problems


@pytest.mark.parametrize("stored, ok", [
    ({"value": {"a": [1, 2]}}, True), ({"value": None}, True),
    ({"__bytes_b64__": "AGdyYWlu/w=="}, True), ({"__bytes_b64__": "***"}, False),
    ({"__bytes_b64__": 3}, False), ({}, False), ({"value": 1, "x": 2}, False), ("x", False),
])
def test_data_state_schema(stored, ok):
    assert (jaxckpt.format.validate_data_state(stored) == []) == ok


# -- no pickle anywhere ----------------------------------------------------------------------

PACKAGE = pathlib.Path(jaxckpt.__file__).parent
FORBIDDEN = re.compile(r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|joblib|shelve|marshal)\b"
                       r"|allow_pickle\s*=\s*True|\bpickle\.loads?\(|__reduce__",
                       re.M)


def test_no_pickle_in_the_package():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) >= 8
    offenders = {str(p.relative_to(PACKAGE)): FORBIDDEN.findall(p.read_text())
                 for p in sources}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_restore_runs_no_unpickling(saved, monkeypatch):
    """Restoring works with every unpickling entry point disabled (Orbax's path included)."""
    d, states = saved

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    real_np_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, allow_pickle=False, **k: refuse() if allow_pickle
                        else real_np_load(*a, allow_pickle=False, **k))
    with CheckpointManager(d, read_only=True) as m:
        ckpt = m.restore_checkpoint("best", target=init_state())
        assert leaves_equal(ckpt.state, states[2]) and ckpt.data_state == {"batch": 2}
        assert leaves_equal(m.restore(4)["params"], states[4].params)
        assert m.verify()[4] == []


def test_crc32c_fingerprints_of_older_writers_verify_with_either_package(tmp_path, monkeypatch):
    """Until 2026-12 host arrays were fingerprinted with CRC-32C. google-crc32c (holds the
    GIL: 2 MiB chunks) and crc32c (one call per array) compute the same CRC-32C: such a
    checkpoint fingerprinted by either restores and verifies with the other, and a
    flipped byte is found either way."""
    from jaxckpt import crc, fingerprint

    google = crc.Crc32c(google_crc32c.extend, True, False)
    fast = crc.best()
    assert fast.releases_gil  # the crc32c package, as installed with jaxckpt
    state = array_state(7)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    for step, (writer, reader) in enumerate([(google, fast), (fast, google)], start=1):
        d = tmp_path / str(step)
        monkeypatch.setattr(crc, "best", lambda: writer)
        monkeypatch.setattr(fingerprint, "HOST_ALGORITHM", "crc32c")  # an older writer
        with CheckpointManager(d, CheckpointPolicy(keep_latest=1)) as m:
            m.save(1, state)
        manifest = json.loads((d / "1" / integrity.MANIFEST_FILE).read_text())
        assert manifest["arrays"]["leaves"]["large"] == {
            "crc32c": google_crc32c.value(np.asarray(state["large"]).tobytes())}
        manifest["format"] = "jaxckpt-manifest/2"  # as the older writer named it
        integrity.write_manifest(d / "1", manifest)
        monkeypatch.setattr(crc, "best", lambda: reader)
        monkeypatch.setattr(fingerprint, "HOST_ALGORITHM", "xxh3_64")  # read by today's
        with CheckpointManager(d, read_only=True) as m:
            assert m.verify() == {1: []}
            assert leaves_equal(m.restore(1, target=target), state)
        head = np.asarray(state["large"]).tobytes()[:64]
        data = next(p for p in (d / "1").glob("state/**/d/*") if head in p.read_bytes())
        raw = bytearray(data.read_bytes())
        raw[raw.find(head) + 3 * (2 << 20) // 2] ^= 0x10  # in the second 2 MiB chunk
        data.write_bytes(bytes(raw))
        with CheckpointManager(d, read_only=True) as m:
            with pytest.raises(jaxckpt.CheckpointCorruptError, match="state/large: array data"):
                m.restore(1, target=target)


def test_device_fingerprints_are_checked_on_the_calling_thread_in_tree_order(monkeypatch):
    # A weighted sum is a jitted reduction: over an array sharded across processes, a
    # collective that every process must dispatch in the same order. Checked from a
    # thread pool, two processes paired different arrays' all-reduces and a good
    # checkpoint failed its check (tests/test_gcs.py's two-process restore, now and then).
    from jaxckpt import fingerprint
    from jaxckpt.target import path_str

    tree = {f"a{i}": jax.numpy.arange(4096.0) + i for i in range(6)}
    tree["host"] = np.arange(4096.0)  # a hash of host bytes: may run on a thread
    expected = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, np.ndarray):
            expected[path_str(path)] = fingerprint.finish(("xxh3_64", leaf))
        else:
            expected[path_str(path)] = fingerprint.finish(
                ("wsum32", fingerprint._of_device_array(leaf)))
    calls = []
    real = fingerprint._of_device_array

    def recorded(x):
        calls.append((threading.current_thread() is threading.main_thread(),
                      float(np.asarray(x)[0])))
        return real(x)
    monkeypatch.setattr(fingerprint, "_of_device_array", recorded)
    check = fingerprint.Check(expected).tree(tree)
    assert check.problems == []
    assert calls == [(True, float(i)) for i in range(6)]  # here, a0 to a5 in order
    flipped = dict(tree, a3=tree["a3"].at[7].set(-1.0))
    assert [p.split(":")[0] for p in fingerprint.Check(expected).tree(flipped).problems] == \
        ["a3"]
