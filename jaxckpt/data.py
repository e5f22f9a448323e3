"""Data: TFDS datasets read through grain, with iterator state that resumes exactly.

Synopsis::

    splits = digits_splits()                       # embedded dataset, no download
    it = batches(splits["train"], 64, seed=0, num_epochs=10)
    for batch in it:                               # {"image": f32 [64,8,8,1], "label": i32 [64]}
        ...
        data_state = it.get_state()                # save with the checkpoint
    it = batches(splits["train"], 64, seed=0, num_epochs=10)
    it.set_state(data_state)                       # continues with the very next batch

Why this shape:

* **No TensorFlow.** TFDS datasets prepared with ``file_format="array_record"`` are read
  by ``tfds.data_source`` / ``builder.as_data_source()`` as random-access sequences of
  numpy dicts; grain does the rest. Nothing here imports TensorFlow.
* **Random access makes resumption exact and cheap.** Every transformation below is a
  ``grain.MapDataset`` (index -> element) until the very end, so an iterator's position
  is one integer, and ``set_state`` seeks instead of replaying.
  ``get_state()`` returns a JSON-able ``dict`` (``{"next_index": int}`` in grain 0.2.x);
  treat it as opaque and store it as JSON next to the checkpoint.
* **The embedded dataset is a real TFDS dataset.** :class:`SklearnDigits` is a
  ``GeneratorBasedBuilder`` over scikit-learn's 8x8 digits (1,797 images shipped inside
  the sklearn wheel), so the demo path and the "any TFDS dataset" path are the same code.
* **Splits are views, not copies.** :func:`split_dataset` slices a fixed permutation of
  indices; nothing is rewritten to disk.

Determinism: the split permutation and the per-run shuffle seeds are derived from the
given seed with ``numpy.random.SeedSequence`` and permuted with grain's index shuffle;
epoch ``e`` of :func:`batches` is a fresh permutation (grain folds the epoch into the
shuffle seed), the same on every run and after every restore.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

__all__ = [
    "SklearnDigits",
    "DATA_DIR_ENV",
    "default_data_dir",
    "prepare_digits",
    "digits_splits",
    "load_tfds",
    "split_dataset",
    "normalize",
    "batches",
    "num_batches",
    "as_dataset",
    "check_keys",
    "ArraySource",
]

Example = dict[str, Any]

DATA_DIR_ENV = "JAXCKPT_DATA_DIR"
"""Environment variable that overrides where the embedded dataset is prepared."""


def default_data_dir() -> str:
    """Where :func:`prepare_digits` writes when no ``data_dir`` is given.

    ``$JAXCKPT_DATA_DIR`` if set, else ``~/.cache/jaxckpt/tensorflow_datasets``: a cache
    directory, because the data can be regenerated from the sklearn package at any time.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return os.path.expanduser(env)
    return os.path.join(os.path.expanduser("~"), ".cache", "jaxckpt", "tensorflow_datasets")


# --------------------------------------------------------------------------------------
# The embedded dataset.


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits as a TFDS dataset (registered as ``sklearn_digits``).

    One ``"train"`` split with all 1,797 examples; use :func:`split_dataset` (or
    :func:`digits_splits`) for train/validation/test. Features:

    * ``image``: ``uint8`` ``(8, 8, 1)`` in ``0..255`` -- sklearn's ``0..16`` intensities
      times ``255/16``, rounded, so the images have MNIST's dtype and range and one
      :func:`normalize` serves both. Stored as a raw tensor (no PNG), so neither
      TensorFlow nor an image codec is needed to write or read it.
    * ``label``: ``ClassLabel`` with 10 classes (``int64`` when read).
    * ``index``: ``int64``, the example's position in ``sklearn.datasets.load_digits()``,
      a stable identity (TFDS stores examples in a hashed order, not sklearn's).

    Prepare it with :func:`prepare_digits`, which is safe against concurrent callers.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Optical recognition of handwritten digits (UCI), as shipped by "
                "scikit-learn: 1,797 8x8 grayscale images of the digits 0-9."
            ),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            citation=(
                "@misc{alpaydin1998digits, author={Alpaydin, E. and Kaynak, C.}, "
                "title={Optical Recognition of Handwritten Digits}, year={1998}, "
                "howpublished={UCI Machine Learning Repository}}"
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships inside scikit-learn.
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        from sklearn.datasets import load_digits  # Heavy import; only needed to prepare.

        digits = load_digits()
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        for i, (image, label) in enumerate(zip(images, digits.target)):
            yield i, {"image": image, "label": int(label), "index": i}


@contextlib.contextmanager
def _exclusive_lock(directory: str) -> Iterator[None]:
    """An advisory inter-process lock on ``directory`` (POSIX ``flock``).

    TFDS already writes into a temporary directory and renames it into place, so a
    reader never sees half a dataset; the lock additionally stops a second writer from
    failing on that rename (or duplicating work) when two processes prepare at once.
    On platforms without ``fcntl`` or on remote paths it is a no-op.
    """
    try:
        import fcntl
    except ImportError:  # Windows.
        fcntl = None
    if fcntl is None or "://" in directory:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".sklearn_digits.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_digits(data_dir: str | os.PathLike | None = None) -> SklearnDigits:
    """Returns the :class:`SklearnDigits` builder, preparing it first if needed.

    Preparation takes about a second and happens once per ``data_dir``; later calls
    only read ``dataset_info.json``. Safe when several processes (e.g. pytest-xdist
    workers or the hosts of a multi-process run) call it at the same time.

    Args:
      data_dir: TFDS data directory; defaults to :func:`default_data_dir`.
    """
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    with _quiet_tfds():
        builder = SklearnDigits(data_dir=data_dir, file_format="array_record")
        if builder.is_prepared():
            return builder
    with _exclusive_lock(data_dir), _quiet_tfds():
        # A fresh builder: another process may have finished while we waited, and a
        # builder only reads the on-disk DatasetInfo when it is constructed.
        builder = SklearnDigits(data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
    return builder


def _drop_unprepared_variant(record: Any) -> bool:
    return "has no dataset_info.json" not in record.getMessage()


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """TFDS's messages for a dataset it downloads ("Downloading and preparing dataset",
    printed to stdout; "Variant folder ... has no dataset_info.json" before the first
    preparation): the embedded digits are built locally and downloaded from nowhere."""
    import logging
    absl_log = logging.getLogger("absl")
    absl_log.addFilter(_drop_unprepared_variant)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        absl_log.removeFilter(_drop_unprepared_variant)


def digits_splits(
    data_dir: str | os.PathLike | None = None,
    fractions: Sequence[float] | Mapping[str, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, grain.MapDataset]:
    """The embedded digits dataset split into train/validation/test, ready for :func:`batches`.

    Prepares the data on first use (no download). Examples are dicts of numpy arrays
    (``image``, ``label``, ``index``, see :class:`SklearnDigits`). The split depends only
    on ``fractions`` and ``seed``, so every process and every resumed run agrees on it.

    Args:
      data_dir: TFDS data directory; defaults to :func:`default_data_dir`.
      fractions: see :func:`split_dataset`; the default gives 1258/269/270 examples.
      seed: seed of the split permutation (not of the training shuffle).
    """
    source = prepare_digits(data_dir).as_data_source(split="train")
    return split_dataset(grain.MapDataset.source(source), fractions, seed=seed)


# --------------------------------------------------------------------------------------
# Any prepared TFDS dataset.


def load_tfds(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
) -> grain.MapDataset:
    """A prepared TFDS dataset as a ``grain.MapDataset`` of numpy dicts, without TensorFlow.

    Args:
      name: TFDS name, optionally with config and version (``"mnist"``,
        ``"mnist:3.0.1"``).
      split: TFDS split, including slicing syntax (``"train"``, ``"train[:90%]"``).
      data_dir: TFDS data directory; defaults to TFDS's own (``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      download: prepare the dataset (in ``array_record`` format) if missing. Off by
        default, so that a training script never starts a download by surprise.

    Raises:
      FileNotFoundError: the dataset is not prepared in ``array_record`` format in
        ``data_dir``; the message says how to prepare it.
    """
    if data_dir is not None:
        data_dir = os.fspath(data_dir)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except (NotImplementedError, FileNotFoundError, ValueError) as e:
        try:
            prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
        except Exception:  # pylint: disable=broad-except
            prepared = True  # Unknown: keep the original error.
        if prepared:
            raise
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in data_dir={data_dir or 'TFDS default'}. "
            f"Prepare it once in array_record format, e.g. "
            f"load_tfds({name!r}, {split!r}, data_dir=..., download=True), or "
            f"`tfds build {name} --file_format=array_record`."
        ) from e
    return grain.MapDataset.source(source)


# --------------------------------------------------------------------------------------
# Splitting.


class _Lookup:
    """``i -> dataset[i]``; a class rather than a lambda so pipelines stay picklable."""

    def __init__(self, dataset: grain.MapDataset):
        self._dataset = dataset

    def __call__(self, index: Any) -> Any:
        return self._dataset[int(index)]

    def __repr__(self) -> str:
        return f"_Lookup({self._dataset})"


def _derive_seed(seed: int, purpose: str) -> int:
    """A 32-bit seed for one purpose, so that nearby seeds give unrelated streams.

    grain's shuffle uses ``seed + epoch`` for epoch ``epoch``; using the user's seed
    directly would make epoch 1 of seed 0 equal epoch 0 of seed 1.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    words = [int(seed), *purpose.encode()]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0])


def _split_permutation(n: int, seed: int) -> np.ndarray:
    """The permutation of ``range(n)`` that :func:`split_dataset` cuts into parts.

    grain's index shuffle: documented deterministic for a given seed, independent of
    numpy's Generator streams (which numpy does not promise to keep across versions).
    Read by index, not by iterating: iteration starts grain's threaded reader, ~2 s for
    1,797 indices against ~0.1 s. Resume depends on these exact values.
    """
    shuffled = grain.MapDataset.range(n).shuffle(_derive_seed(seed, "split"))
    return np.array([shuffled[i] for i in range(n)], dtype=np.int64)


def split_dataset(
    dataset: grain.MapDataset,
    fractions: Sequence[float] | Mapping[str, float] = (0.7, 0.15, 0.15),
    *,
    seed: int = 0,
) -> dict[str, grain.MapDataset]:
    """Splits ``dataset`` into disjoint parts by fractions of a fixed random permutation.

    Each part is ``MapDataset.source(permutation)[start:stop].map(dataset[i])``: a view,
    no data is copied. Parts stay the same set of examples however many epochs are read
    from them (indices past the end wrap around within the part), so shuffling a part
    per epoch never leaks examples from another part.

    Args:
      dataset: a finite ``grain.MapDataset``.
      fractions: fractions that sum to 1, either a mapping ``{name: fraction}`` or a
        sequence of 2 or 3 fractions named ``train``, ``validation`` (and ``test``).
        Part ``k`` gets ``round(n * cumsum[k]) - round(n * cumsum[k-1])`` examples.
      seed: seed of the permutation.

    Returns:
      ``{name: grain.MapDataset}`` in the order given.
    """
    if isinstance(fractions, Mapping):
        names, fracs = list(fractions), [float(f) for f in fractions.values()]
    else:
        fracs = [float(f) for f in fractions]
        if len(fracs) not in (2, 3):
            raise ValueError(
                f"fractions needs 2 or 3 values (train, validation[, test]) or a mapping "
                f"{{name: fraction}}; got {fractions!r}."
            )
        names = ["train", "validation", "test"][: len(fracs)]
    if any(f < 0 for f in fracs) or abs(sum(fracs) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1; got {fractions!r}.")
    n = len(dataset)
    if n == 0 or n >= sys.maxsize:
        raise ValueError(
            f"split_dataset needs a finite, non-empty dataset (split before `repeat`); "
            f"got length {n}."
        )

    permutation = _split_permutation(n, seed)
    bounds = [0, *(round(n * c) for c in np.cumsum(fracs)[:-1]), n]
    indices = grain.MapDataset.source(permutation)
    lookup = _Lookup(dataset)
    return {
        name: indices[start:stop].map(lookup)
        for name, start, stop in zip(names, bounds[:-1], bounds[1:])
    }


# --------------------------------------------------------------------------------------
# The data contract: what ``Trainer.fit`` / ``evaluate`` / ``predict`` accept.


class ArraySource:
    """Random access over a dict of equal-length arrays (a grain data source).

    Arrays are converted to numpy once (a JAX array is copied to the host here), so every
    batch is cut from host memory the same way, whatever the input was.
    """

    def __init__(self, arrays: Mapping[str, Any]):
        self.arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
        if not self.arrays:
            raise ValueError("got an empty dict of arrays; pass e.g. {'x': X, 'y': y}.")
        lengths = {k: len(v) if np.ndim(v) else None for k, v in self.arrays.items()}
        if None in lengths.values() or len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must share their first (example) axis; got lengths "
                             f"{lengths}.")
        self.n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}

    def __repr__(self) -> str:
        return f"ArraySource({ {k: v.shape for k, v in self.arrays.items()} })"


def as_dataset(data: Any, input_key: str = "image", label_key: str = "label",
               ) -> grain.MapDataset | None:
    """Any accepted form of training or evaluation data as a ``grain.MapDataset``.

    Accepted:

    * ``(x, y)``: a tuple (or list) of two arrays (numpy, JAX, anything ``np.asarray``
      takes) with one example per row, stored under ``input_key`` and ``label_key``;
    * ``x`` alone (a single array, for :meth:`Trainer.predict`), stored under ``input_key``;
    * a dict of equal-length arrays with any keys (the Trainer reads ``input_key`` and
      ``label_key`` from it);
    * a ``grain.MapDataset`` of example dicts (e.g. from :func:`digits_splits`,
      :func:`load_tfds`), or any random-access source (``len`` and ``[i]``) of example
      dicts, such as ``tfds.data_source(...)``;
    * ``None`` (no data), returned as ``None``.
    """
    if data is None or isinstance(data, grain.MapDataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            hasattr(a, "shape") or isinstance(a, (list, tuple)) for a in data):
        return grain.MapDataset.source(ArraySource({input_key: data[0], label_key: data[1]}))
    if isinstance(data, tuple) and data and all(hasattr(a, "shape") for a in data):
        raise TypeError(
            f"got a tuple of {len(data)} arrays; pass (x, y): inputs and labels, one example "
            "per row (or a dict of equal-length arrays, for more than two).")
    if isinstance(data, Mapping):
        return grain.MapDataset.source(ArraySource(data))
    if hasattr(data, "shape") and hasattr(data, "dtype"):
        return grain.MapDataset.source(ArraySource({input_key: data}))
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(
            data, (str, bytes)):
        return grain.MapDataset.source(data)
    raise TypeError(
        f"cannot train on a {type(data).__name__}. Pass (x, y) arrays, a dict of equal-length "
        "arrays, a grain.MapDataset of example dicts, or a random-access source of them "
        "(see jaxckpt.data.as_dataset).")


def check_keys(example: Any, *keys: str) -> None:
    """Raise a ValueError naming the keys an example has when one of ``keys`` is missing.

    Checked on the first example, before anything is compiled or trained, so a
    mismatch costs nothing but the message.
    """
    if not isinstance(example, Mapping):
        raise TypeError(f"examples must be dicts of arrays, got {type(example).__name__}; "
                        "pass (x, y) arrays, a dict of arrays, or map your dataset to dicts.")
    missing = [k for k in keys if k not in example]
    if len(keys) == 2 and missing == [keys[1]] and list(example) == [keys[0]]:
        raise ValueError(
            f"the data holds inputs only ({keys[0]!r}), no labels ({keys[1]!r}): pass (x, y) "
            "arrays to fit and evaluate (predict takes x alone), or a dict with both.")
    if missing:
        raise ValueError(
            f"batch has keys {sorted(example)} but the Trainer reads "
            f"{', '.join(map(repr, missing))}; set Trainer(input_key=..., label_key=...) to the "
            "keys of your inputs and labels.")


# --------------------------------------------------------------------------------------
# Preprocessing and batching.


def normalize(example: Mapping[str, Any], *, flatten: bool = False) -> Example:
    """``{"image": float32 in [0, 1], "label": int32}`` from a TFDS image example or batch.

    Keeps only ``image`` and ``label`` so that every batch has one fixed structure
    (a jitted step retraces on a new key or dtype; int64 would need ``jax_enable_x64``).
    ``uint8`` images are divided by 255; floating-point images are taken as already
    scaled and only cast, so applying ``normalize`` twice is harmless.

    Args:
      example: a dict with ``image`` (``[..., H, W, C]``) and ``label``; works on single
        examples and on batches.
      flatten: reshape images ``[..., H, W, C] -> [..., H*W*C]`` (for MLPs).
    """
    image = np.asarray(example["image"])
    if image.dtype == np.uint8:
        image = image.astype(np.float32) * np.float32(1.0 / 255.0)
    elif np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32, copy=False)
    else:
        raise TypeError(
            f"normalize expects uint8 images (0..255) or floating-point images, got "
            f"{image.dtype}; map your own scaling before batching instead."
        )
    if flatten and image.ndim >= 3:
        image = image.reshape(image.shape[:-3] + (-1,))
    return {"image": image, "label": np.asarray(example["label"], dtype=np.int32)}


def _shard(dataset: grain.MapDataset, shard_index: int, shard_count: int) -> grain.MapDataset:
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
            f"shard_count={shard_count}."
        )
    if shard_count == 1:
        return dataset
    # Equal-sized shards: every process must take the same number of steps, or the
    # collectives of a data-parallel step deadlock.
    usable = (len(dataset) // shard_count) * shard_count
    return dataset[shard_index:usable:shard_count]


def num_batches(
    dataset: grain.MapDataset,
    batch_size: int,
    *,
    drop_remainder: bool = True,
    shard_count: int = 1,
) -> int:
    """Batches per epoch that :func:`batches` yields with the same arguments (steps per epoch)."""
    n = len(dataset) // shard_count
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
    dataset: grain.MapDataset,
    batch_size: int,
    *,
    seed: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    num_epochs: int | None = 1,
    transform: Callable[[Any], Any] | None = normalize,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator over batches of ``dataset``, reshuffled every epoch.

    The pipeline is ``shuffle -> shard -> map(transform) -> batch -> repeat``, all
    ``grain.MapDataset`` operations, so batch ``k`` is a pure function of
    ``(dataset, arguments, k)``. Epochs are whole: each epoch is one permutation of the
    data cut into batches (with ``drop_remainder`` the leftover examples of an epoch are
    dropped, never mixed into the next epoch's first batch), and epoch ``e`` is shuffled
    with its own seed.

    Resuming: ``state = it.get_state()`` gives a JSON-able dict (``{"next_index": k}``:
    ``k`` batches consumed); a new iterator built with the **same arguments** and given
    ``it.set_state(state)`` yields exactly the batches the old one would have. The state
    does not record the arguments: restoring it into a different pipeline silently
    yields that pipeline's batches from position ``k``.

    Args:
      dataset: a finite ``grain.MapDataset`` of examples (e.g. from
        :func:`digits_splits` or :func:`load_tfds`).
      batch_size: examples per batch (per process when sharded).
      seed: shuffle seed, required when ``shuffle``; any non-negative int.
      shuffle: shuffle each epoch; turn off for evaluation.
      drop_remainder: drop each epoch's last partial batch, so all batches have one
        shape (one compilation of a jitted step). Turn off for evaluation.
      num_epochs: epochs to iterate, or ``None`` for endless.
        ``num_batches(...)`` batches make one epoch.
      transform: applied to each example before batching; default :func:`normalize`
        gives ``{"image": float32 [B, ...], "label": int32 [B]}``. ``None`` batches the
        examples as they are.
      shard_index, shard_count: for multi-process data parallelism, process
        ``shard_index`` of ``shard_count`` reads its own disjoint, equal-sized share of
        every epoch; all processes must pass the same ``seed``.
      read_options: grain threading/prefetch options; the default reads with 2 threads
        and prefetches 8 batches. Threading never changes the order.

    Returns:
      A ``grain.DatasetIterator`` with ``get_state()`` / ``set_state()``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    ds = dataset
    if shuffle:
        if seed is None:
            raise ValueError("batches(shuffle=True) needs a seed, e.g. batches(ds, 64, seed=0).")
        ds = ds.shuffle(_derive_seed(seed, "shuffle"))
    ds = _shard(ds, shard_index, shard_count)
    if transform is not None:
        ds = ds.map(transform)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if len(ds) == 0:
        raise ValueError(
            f"no batches: {len(dataset)} examples (shard of {len(dataset) // shard_count}) "
            f"with batch_size={batch_size} and drop_remainder={drop_remainder}."
        )
    ds = ds.repeat(num_epochs)
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
    return iter(ds.to_iter_dataset(read_options))
