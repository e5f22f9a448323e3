"""Tests for jaxckpt.data: the embedded TFDS dataset, splits, grain batching, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxckpt import data

N_DIGITS = 1797


@pytest.fixture(scope="module")
def splits(digits_dir):
    return data.digits_splits(digits_dir)


def _indices(dataset):
    return np.array([int(dataset[i]["index"]) for i in range(len(dataset))])


def _collect(it, key="index"):
    return [np.asarray(b[key]) for b in it]


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            np.testing.assert_array_equal(g[k], w[k])


# ----------------------------------------------------------------------------- builder


def test_digits_builder_prepares_all_examples(digits_dir):
    builder = data.prepare_digits(digits_dir)  # second call: reuses, does not rebuild
    assert builder.info.splits["train"].num_examples == N_DIGITS
    assert builder.info.file_format.value == "array_record"
    source = builder.as_data_source(split="train")
    assert len(source) == N_DIGITS

    examples = [source[i] for i in range(N_DIGITS)]
    images = np.stack([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    index = np.array([e["index"] for e in examples])
    assert images.shape == (N_DIGITS, 8, 8, 1) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    assert set(labels.tolist()) == set(range(10))
    assert sorted(index.tolist()) == list(range(N_DIGITS))

    # The stored data is sklearn's, scaled 0..16 -> 0..255, under its sklearn index.
    from sklearn.datasets import load_digits

    sk = load_digits()
    want = np.rint(sk.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(images, want[index])
    np.testing.assert_array_equal(labels, sk.target[index])


def test_prepared_digits_readable_through_tfds_by_name(digits_dir):
    ds = data.load_tfds("sklearn_digits", "train[:10%]", data_dir=digits_dir)
    assert len(ds) == 180
    assert ds[0]["image"].shape == (8, 8, 1)


def test_default_data_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "x"))
    assert data.default_data_dir() == str(tmp_path / "x")
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert data.default_data_dir().endswith(os.path.join(".cache", "jaxckpt", "tensorflow_datasets"))


def test_concurrent_preparation_does_not_corrupt(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from jaxckpt import data
        build = data.SklearnDigits.download_and_prepare
        def counted(self, *args, **kwargs):
            print("BUILT", file=sys.stderr)  # TFDS's own stdout message is silenced
            return build(self, *args, **kwargs)
        data.SklearnDigits.download_and_prepare = counted
        b = data.prepare_digits(sys.argv[1])
        src = b.as_data_source(split="train")
        print("OK", len(src), sum(int(src[i]["index"]) for i in range(len(src))))
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert f"OK {N_DIGITS} {N_DIGITS * (N_DIGITS - 1) // 2}" in out
    # The lock makes the loser reuse the winner's data instead of generating it again.
    assert sum("BUILT" in err for _, err in outs) == 1
    # TFDS's "Downloading and preparing dataset": nothing is downloaded
    assert not any("Downloading" in out or "Variant folder" in err for out, err in outs)
    dataset_dir = tmp_path / "sklearn_digits"
    assert sorted(os.listdir(dataset_dir)) == ["1.0.0"]  # no leftover incomplete.* dirs
    assert len(data.prepare_digits(tmp_path).as_data_source(split="train")) == N_DIGITS


# ----------------------------------------------------------------------------- splits


def test_split_sizes_disjoint_and_cover(splits):
    assert list(splits) == ["train", "validation", "test"]
    assert [len(s) for s in splits.values()] == [1258, 269, 270]
    parts = [set(_indices(s).tolist()) for s in splits.values()]
    assert sum(len(p) for p in parts) == N_DIGITS
    assert set.union(*parts) == set(range(N_DIGITS))


def test_split_deterministic_and_seeded(digits_dir, splits):
    again = data.digits_splits(digits_dir)
    other = data.digits_splits(digits_dir, seed=1)
    for name in splits:
        np.testing.assert_array_equal(_indices(splits[name]), _indices(again[name]))
    assert set(_indices(other["test"]).tolist()) != set(_indices(splits["test"]).tolist())


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 5), (300, 2**31 + 7), (N_DIGITS, 0)])
def test_split_permutation_is_grains_iteration_order(n, seed):
    # split_dataset reads the shuffle by index (fast); checkpoints written when it
    # iterated the shuffled dataset must still resume into the same parts.
    iterated = np.fromiter(grain.MapDataset.range(n).shuffle(data._derive_seed(seed, "split")),
                           dtype=np.int64, count=n)
    got = data._split_permutation(n, seed)
    assert got.dtype == np.int64 and sorted(got.tolist()) == list(range(n))
    np.testing.assert_array_equal(got, iterated)


def test_split_is_stable_across_epochs(splits):
    # grain wraps indices past the end into later "epochs"; a part must still map to
    # the same examples there, or per-epoch shuffling would leak other parts in.
    train = splits["train"]
    n = len(train)
    for i in (0, 17, n - 1):
        assert int(train[i + n]["index"]) == int(train[i]["index"])
        assert int(train[i + 3 * n]["index"]) == int(train[i]["index"])


def test_split_fractions_mapping_and_errors(splits):
    ds = splits["train"]
    parts = data.split_dataset(ds, {"a": 0.5, "b": 0.5}, seed=3)
    assert list(parts) == ["a", "b"] and len(parts["a"]) + len(parts["b"]) == len(ds)
    two = data.split_dataset(ds, (0.9, 0.1))
    assert list(two) == ["train", "validation"]
    with pytest.raises(ValueError, match="sum to 1"):
        data.split_dataset(ds, (0.5, 0.3, 0.1))
    with pytest.raises(ValueError, match="2 or 3"):
        data.split_dataset(ds, (1.0,))


# ----------------------------------------------------------------------------- batching


def test_batches_structure_and_dtypes(splits):
    it = data.batches(splits["train"], 32, seed=0)
    batch = next(it)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert len(list(it)) + 1 == data.num_batches(splits["train"], 32) == 1258 // 32


def test_shuffle_is_seeded(splits):
    train = splits["train"]
    a = _collect(data.batches(train, 64, seed=0, transform=None))
    b = _collect(data.batches(train, 64, seed=0, transform=None))
    c = _collect(data.batches(train, 64, seed=1, transform=None))
    unshuffled = np.concatenate(_collect(data.batches(train, 64, shuffle=False, transform=None)))
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    assert not np.array_equal(np.concatenate(a), unshuffled)
    np.testing.assert_array_equal(unshuffled, _indices(train)[: len(unshuffled)])
    with pytest.raises(ValueError, match="needs a seed"):
        data.batches(train, 64)


def test_epochs_are_whole_and_reshuffled(splits):
    train = splits["train"]
    members = sorted(_indices(train).tolist())
    # Without drop_remainder every epoch is exactly one permutation of the split.
    bs = 100
    per_epoch = data.num_batches(train, bs, drop_remainder=False)
    got = _collect(data.batches(train, bs, seed=0, num_epochs=3, drop_remainder=False,
                                transform=None))
    assert len(got) == 3 * per_epoch
    assert [len(b) for b in got[:per_epoch]] == [bs] * (per_epoch - 1) + [len(train) % bs]
    epochs = [np.concatenate(got[e * per_epoch:(e + 1) * per_epoch]) for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == members
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    # With drop_remainder the leftovers of an epoch are dropped, not carried over.
    dropped = _collect(data.batches(train, bs, seed=0, num_epochs=2, transform=None))
    assert len(dropped) == 2 * (len(train) // bs)
    assert all(len(b) == bs for b in dropped)
    np.testing.assert_array_equal(np.concatenate(dropped[: len(train) // bs]),
                                  epochs[0][: (len(train) // bs) * bs])


def _three_epochs(splits):
    return data.batches(splits["train"], 64, seed=5, num_epochs=3)


@pytest.fixture(scope="module")
def three_epochs(splits):
    """Every batch of an uninterrupted 3-epoch read, once for every stopping point."""
    return list(_three_epochs(splits))


@pytest.mark.parametrize("stop_after", [0, 7, 19, 30, 57])
def test_state_restore_continues_exactly(splits, three_epochs, stop_after):
    reference = three_epochs
    assert len(reference) == 3 * 19

    it = _three_epochs(splits)
    for _ in range(stop_after):
        next(it)
    state = it.get_state()
    assert isinstance(state, dict)
    state = json.loads(json.dumps(state))  # what a checkpoint would store

    resumed = _three_epochs(splits)
    resumed.set_state(state)
    _assert_same_batches(list(resumed), reference[stop_after:])


def test_state_restore_into_used_iterator_and_threading_invariance(splits):
    ref = list(data.batches(splits["train"], 50, seed=2, num_epochs=2))
    it = data.batches(splits["train"], 50, seed=2, num_epochs=2,
                      read_options=grain.ReadOptions(num_threads=0))
    for _ in range(10):
        next(it)
    state = it.get_state()
    for _ in range(20):  # run ahead, then rewind
        next(it)
    it.set_state(state)
    _assert_same_batches(list(it), ref[10:])


def test_shards_are_disjoint_and_equal(splits):
    train = splits["train"]
    per_shard = [
        _collect(data.batches(train, 16, seed=0, num_epochs=2, transform=None,
                              shard_index=i, shard_count=3))
        for i in range(3)
    ]
    assert len({len(s) for s in per_shard}) == 1
    steps = data.num_batches(train, 16, shard_count=3)
    assert len(per_shard[0]) == 2 * steps
    for epoch in range(2):
        sl = slice(epoch * steps, (epoch + 1) * steps)
        seen = [np.concatenate(s[sl]).tolist() for s in per_shard]
        flat = sum(seen, [])
        assert len(flat) == len(set(flat))
        assert set(flat) <= set(_indices(train).tolist())


def test_normalize():
    ex = {"image": np.full((8, 8, 1), 255, np.uint8), "label": np.int64(7), "index": 3}
    out = data.normalize(ex)
    assert set(out) == {"image", "label"}
    assert out["image"].dtype == np.float32 and out["image"].max() == 1.0
    assert out["label"].dtype == np.int32 and out["label"] == 7
    assert data.normalize(ex, flatten=True)["image"].shape == (64,)
    batch = {"image": np.zeros((4, 8, 8, 1), np.uint8), "label": np.arange(4)}
    assert data.normalize(batch, flatten=True)["image"].shape == (4, 64)
    np.testing.assert_array_equal(data.normalize(out)["image"], out["image"])  # idempotent
    with pytest.raises(TypeError, match="uint8"):
        data.normalize({"image": np.zeros((8, 8, 1), np.int64), "label": 0})


# ----------------------------------------------------------------------------- any TFDS dataset


def test_load_tfds_mock_mnist_with_grain_batching(tmp_path):
    with tfds.testing.mock_data(num_examples=40):
        ds = data.load_tfds("mnist", split="train", data_dir=tmp_path)
        assert len(ds) == 40
        assert ds[0]["image"].shape == (28, 28, 1)

        def make():
            return data.batches(ds, 8, seed=0, num_epochs=2)

        reference = list(make())
        assert len(reference) == 10
        assert reference[0]["image"].shape == (8, 28, 28, 1)
        assert reference[0]["image"].dtype == np.float32
        assert reference[0]["label"].dtype == np.int32
        it = make()
        for _ in range(6):
            next(it)
        resumed = make()
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        _assert_same_batches(list(resumed), reference[6:])


def test_load_tfds_unprepared_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared"):
        data.load_tfds("mnist", split="train", data_dir=tmp_path)


# -- the data contract of Trainer.fit ---------------------------------------------------


def test_as_dataset_accepts_the_documented_forms(splits):
    import jax.numpy as jnp

    x, y = np.arange(12, dtype=np.float32).reshape(6, 2), np.arange(6)
    for form in [(x, y), [x, y], (jnp.asarray(x), jnp.asarray(y))]:
        ds = data.as_dataset(form, "image", "label")
        assert len(ds) == 6 and set(ds[5]) == {"image", "label"}
        np.testing.assert_array_equal(ds[5]["image"], x[5])
        assert ds[5]["label"] == 5
    keyed = data.as_dataset({"pixels": x, "digit": y})
    assert set(keyed[0]) == {"pixels", "digit"}
    assert set(data.as_dataset(x, input_key="inputs")[0]) == {"inputs"}
    assert data.as_dataset(splits["train"]) is splits["train"]
    source = [{"image": x[i], "label": y[i]} for i in range(6)]  # any random-access source
    assert data.as_dataset(source)[3]["label"] == 3
    assert data.as_dataset(None) is None


def test_as_dataset_and_check_keys_name_the_problem():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"share their first .*lengths \{'image': 4, 'label': 3\}"):
        data.as_dataset((x, np.zeros(3)))
    with pytest.raises(TypeError, match=r"cannot train on a set"):
        data.as_dataset({1, 2})
    with pytest.raises(ValueError, match=r"batch has keys \['x', 'y'\] but the Trainer reads "
                                         r"'image'; set Trainer\(input_key=\.\.\."):
        data.check_keys({"x": 1, "y": 2}, "image", "y")
    data.check_keys({"image": 1, "label": 2}, "image", "label")
