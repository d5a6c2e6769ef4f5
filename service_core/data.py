"""Data sets: scikit-learn digits, MNIST IDX files, two-class CIFAR ``.npz`` files and user ``.npz`` files.

Every training record has a unique string id, stable across deletions. Inputs are float32 arrays
of shape ``(N, *input_shape)``; targets are either integer class labels (classification) or float
target vectors of shape ``(N, d)`` (regression).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import DatasetError

Task = Literal["classification", "regression"]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A training set with ids, and an optional held-out test set.

    Attributes:
      name: the spec it was loaded from (``digits``, ``mnist:DIR``, ``npz:FILE``).
      ids: array of str, shape ``(N,)``, unique.
      x: float32, shape ``(N, *input_shape)``.
      y: int64 labels ``(N,)`` for classification, float32 targets ``(N, d)`` for regression.
      x_test, y_test: the same for a test set, or ``None``.
      task: ``classification`` or ``regression``.
      output_dim: d, the number of classes or the target dimension.
    """

    name: str
    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    task: Task
    output_dim: int
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    def __post_init__(self):
        _check_ids(self.ids)
        if len(self.x) != len(self.ids) or len(self.y) != len(self.ids):
            raise DatasetError(
                f"x has {len(self.x)} rows, y {len(self.y)} and ids {len(self.ids)}: they must match"
            )
        for name, arr in (("x", self.x), ("x_test", self.x_test)):
            if arr is not None and not np.all(np.isfinite(arr)):
                raise DatasetError(f"{name} has NaN or infinite values")

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, index: np.ndarray | slice) -> Dataset:
        """The training points at ``index`` (the test set is kept)."""
        return dataclasses.replace(self, ids=self.ids[index], x=self.x[index], y=self.y[index])

    def targets(self, y: np.ndarray | None = None) -> np.ndarray:
        """Target matrix ``(n, d)`` float32: one-hot for labels, as given for regression."""
        y = self.y if y is None else y
        return targets_matrix(y, self.task, self.output_dim)


def targets_matrix(y: np.ndarray, task: Task, output_dim: int) -> np.ndarray:
    """One-hot encode labels ``(n,)`` or pass through targets ``(n, d)``; float32 ``(n, d)``."""
    if task == "classification":
        return np.eye(output_dim, dtype=np.float32)[np.asarray(y, dtype=np.int64)]
    return np.asarray(y, dtype=np.float32).reshape(len(y), output_dim)


# The longest id, in characters: the engine holds ids in fixed-width arrays (every row costs as
# much as the longest id), so one 1 MB id made a 1,472-row model hold gigabytes. The API refuses
# longer ones (422) and a data set with one does not load.
MAX_ID_CHARS = 256


def _check_ids(ids: np.ndarray) -> None:
    long = [str(i) for i in ids.tolist() if len(str(i)) > MAX_ID_CHARS]
    if long:
        raise DatasetError(
            f"{len(long)} id(s) are longer than {MAX_ID_CHARS} characters (the first starts "
            f"{long[0][:40]!r}): shorten them, e.g. to a hash"
        )
    dup = sorted(i for i, c in Counter(ids.tolist()).items() if c > 1)
    if dup:
        shown = ", ".join(map(str, dup[:20]))
        raise DatasetError(f"{len(dup)} ids occur more than once: {shown}. Ids must be unique.")


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's handwritten digits (1,797 8×8 images, 10 classes), pixels / 16.

    A seeded, stratified split keeps ``1 - test_fraction`` for training; ids are
    ``digits-00000``… by position in scikit-learn's array, training points in that order.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    index = np.arange(len(x))
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=y)
    train, test = np.sort(train), np.sort(test)
    ids = np.array([f"digits-{i:05d}" for i in train])
    return Dataset("digits", ids, x[train], y[train], "classification", 10, x[test], y[test])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says {shape} but holds {data.size} values")
    return data.reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    return None


def mnist_class_counts(directory: str | os.PathLike, split: str = "t10k") -> np.ndarray:
    """Images per class ``(10,)`` in the ``split`` (``t10k`` or ``train``) IDX labels file: how many
    a caller can ask ``load_mnist`` for."""
    path = _find(Path(directory), f"{split}-labels-idx1-ubyte")
    if path is None:
        raise DatasetError(f"{directory} has no {split}-labels-idx1-ubyte(.gz)")
    return np.bincount(_read_idx(path), minlength=10)


def load_mnist(
    directory: str | os.PathLike,
    seed: int = 0,
    train_per_class: int | None = 200,
    test_per_class: int | None = 200,
) -> Dataset:
    """MNIST from IDX files (optionally gzipped), pixels / 255, flattened to 784.

    With ``train-*`` files in ``directory`` they are the training set and ``t10k-*`` the test set.
    With only ``t10k-*`` (as in ``../shared/data/mnist``) the 10,000 images are split: per class,
    ``train_per_class`` for training and a disjoint ``test_per_class`` for testing (seeded).
    ``None`` takes every remaining image. Ids are ``mnist-<split>-<index>``.

    Raises:
      DatasetError: files missing or malformed, or too few images per class.
    """
    directory = Path(directory)
    t10k_x, t10k_y = (
        _find(directory, "t10k-images-idx3-ubyte"),
        _find(directory, "t10k-labels-idx1-ubyte"),
    )
    tr_x, tr_y = (
        _find(directory, "train-images-idx3-ubyte"),
        _find(directory, "train-labels-idx1-ubyte"),
    )
    if t10k_x is None or t10k_y is None:
        raise DatasetError(
            f"{directory} has no t10k-images-idx3-ubyte(.gz) / t10k-labels-idx1-ubyte(.gz)"
        )
    rng = np.random.default_rng(seed)

    def pick(labels: np.ndarray, per_class: int | None, exclude: np.ndarray) -> np.ndarray:
        chosen = []
        for c in range(10):
            pool = np.setdiff1d(np.flatnonzero(labels == c), exclude)
            if per_class is not None and per_class > len(pool):
                raise DatasetError(f"class {c} has {len(pool)} images, {per_class} asked for")
            chosen.append(rng.permutation(pool)[:per_class] if per_class is not None else pool)
        return np.sort(np.concatenate(chosen))

    xt = _read_idx(t10k_x).reshape(-1, 784).astype(np.float32) / 255.0
    yt = _read_idx(t10k_y).astype(np.int64)
    if tr_x is not None and tr_y is not None:
        xs = _read_idx(tr_x).reshape(-1, 784).astype(np.float32) / 255.0
        ys = _read_idx(tr_y).astype(np.int64)
        train = pick(ys, train_per_class, np.array([], dtype=np.int64))
        test = pick(yt, test_per_class, np.array([], dtype=np.int64))
        ids = np.array([f"mnist-train-{i:05d}" for i in train])
        return Dataset(
            f"mnist:{directory}",
            ids,
            xs[train],
            ys[train],
            "classification",
            10,
            xt[test],
            yt[test],
        )
    train = pick(yt, train_per_class, np.array([], dtype=np.int64))
    test = pick(yt, test_per_class, train)
    ids = np.array([f"mnist-t10k-{i:05d}" for i in train])
    return Dataset(
        f"mnist:{directory}", ids, xt[train], yt[train], "classification", 10, xt[test], yt[test]
    )


def load_npz(path: str | os.PathLike) -> Dataset:
    """A user's ``.npz`` with arrays ``x`` (N, ...), ``y`` (int labels (N,) or float targets (N, d)),
    optional ``ids`` (str, (N,)) and optional ``x_test``, ``y_test``. Inputs are cast to float32 as given.

    Raises:
      DatasetError: missing arrays, mismatched lengths, non-finite values, duplicated ids.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if "x" not in arrays or "y" not in arrays:
        raise DatasetError(f"{path} must hold arrays 'x' and 'y' (it has {sorted(arrays)})")
    x = arrays["x"].astype(np.float32)
    y = arrays["y"]
    if np.issubdtype(y.dtype, np.integer) and y.ndim == 1:
        if y.min() < 0:
            raise DatasetError("class labels in 'y' must be non-negative integers")
        task: Task = "classification"
        output_dim = int(y.max()) + 1
        y = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating):
        task = "regression"
        y = y.astype(np.float32).reshape(len(y), -1)
        output_dim = y.shape[1]
        if not np.all(np.isfinite(y)):
            raise DatasetError("'y' has NaN or infinite values")
    else:
        raise DatasetError("'y' must be int labels of shape (N,) or float targets of shape (N, d)")
    ids = arrays.get("ids")
    ids = (
        np.array([f"{path.stem}-{i:06d}" for i in range(len(x))])
        if ids is None
        else ids.astype(str)
    )
    x_test, y_test = arrays.get("x_test"), arrays.get("y_test")
    if x_test is not None:
        x_test = x_test.astype(np.float32)
        if y_test is not None and task == "regression":
            y_test = y_test.astype(np.float32).reshape(len(y_test), -1)
    return Dataset(f"npz:{path}", ids, x, y, task, output_dim, x_test, y_test)


def _stratified_take(labels: np.ndarray, order: np.ndarray, n: int | None) -> np.ndarray:
    """The first ``n`` indices of ``order`` balanced over the classes of ``labels`` (the first
    ``n mod C`` classes get one more); all of ``order`` for ``None``. Keeps ``order``'s order."""
    if n is None:
        return order
    classes = np.unique(labels)
    per, extra = divmod(n, len(classes))
    keep = np.zeros(len(labels), bool)
    for rank, c in enumerate(classes):
        want = per + (rank < extra)
        pool = order[labels[order] == c]
        if want > len(pool):
            raise DatasetError(f"class {c} has {len(pool)} images, {want} asked for ({n} in all)")
        keep[pool[:want]] = True
    return order[keep[order]]


def _read_cifar2(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        if "x" not in f.files or "y" not in f.files:
            raise DatasetError(f"{path} must hold arrays 'x' and 'y' (it has {sorted(f.files)})")
        x, y = f["x"], f["y"]
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DatasetError(
            f"{path}: 'x' must be uint8 images (N, H, W, C), got {x.dtype} {list(x.shape)}"
        )
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(
            f"{path}: 'y' must be integer labels of shape ({len(x)},), got {y.dtype} {list(y.shape)}"
        )
    return x, y.astype(np.int64)


def load_cifar2(
    path: str | os.PathLike,
    seed: int = 0,
    n_train: int | None = None,
    test_path: str | os.PathLike | None | Literal[False] = None,
    n_test: int | None = None,
    binary_pm1: bool = False,
) -> Dataset:
    """A CIFAR ``.npz`` (e.g. ``../shared/data/cifar10/airplane_automobile_train.npz``): ``x`` uint8
    ``(N, H, W, C)``, ``y`` integer labels 0…C−1 ``(N,)``. Images keep their shape; pixels / 255.

    The file's order is not random (README: one class after the other), so points are shuffled
    with ``seed``; ``n_train`` (``n_test``) then keeps that many, balanced over the classes. Ids are
    ``cifar2-<file stem>-<index in the file>``, stable whatever the seed.

    Arguments:
      path: the training file.
      seed: shuffle seed.
      n_train, n_test: points to keep (``None``: all).
      test_path: the evaluation file; ``None`` uses ``<stem without _train>.npz`` beside ``path``
        when ``path``'s stem ends in ``_train`` and that file exists (the layout of
        ``../shared/data/cifar10``), else no test set; ``False``: no test set.
      binary_pm1: two classes as one output with targets −1 (label 0) and +1 (label 1), task
        ``regression`` (the paper's squared-error setup); else labels, task ``classification``.

    Raises:
      DatasetError: a missing or malformed file, labels not 0…C−1, ``binary_pm1`` with more than
        two classes, or more points asked for than a class has.
    """
    path = Path(path)
    x, y = _read_cifar2(path)
    rng = np.random.default_rng(seed)
    n_classes = int(y.max()) + 1 if len(y) else 0
    if len(y) == 0 or y.min() < 0 or set(np.unique(y).tolist()) != set(range(n_classes)):
        raise DatasetError(
            f"{path}: labels must be the integers 0…C−1, got {sorted(set(y.tolist()))[:10]}"
        )
    if binary_pm1 and n_classes != 2:
        raise DatasetError(f"binary_pm1 needs two classes, {path} has {n_classes}")
    train = _stratified_take(y, rng.permutation(len(y)), n_train)
    if test_path is False:
        test_path = None
    elif test_path is None and path.stem.endswith("_train"):
        sibling = path.with_name(path.stem[: -len("_train")] + path.suffix)
        test_path = sibling if sibling.exists() else None
    x_test = y_test = None
    if test_path is not None:
        xt, yt = _read_cifar2(Path(test_path))
        if xt.shape[1:] != x.shape[1:]:
            raise DatasetError(
                f"{test_path} holds images {list(xt.shape[1:])}, {path} {list(x.shape[1:])}"
            )
        if yt.min() < 0 or yt.max() >= n_classes:
            raise DatasetError(f"{test_path} has labels outside 0…{n_classes - 1}")
        test = _stratified_take(yt, rng.permutation(len(yt)), n_test)
        x_test, y_test = xt[test].astype(np.float32) / 255.0, yt[test]

    def targets(labels):
        return (2.0 * labels - 1.0).astype(np.float32)[:, None] if binary_pm1 else labels

    ids = np.array([f"cifar2-{path.stem}-{i:05d}" for i in train])
    task: Task = "regression" if binary_pm1 else "classification"
    return Dataset(
        f"cifar2:{path}",
        ids,
        x[train].astype(np.float32) / 255.0,
        targets(y[train]),
        task,
        1 if binary_pm1 else n_classes,
        x_test,
        None if y_test is None else targets(y_test),
    )


def load_dataset(spec: str, seed: int = 0, **kwargs) -> Dataset:
    """Load ``digits``, ``mnist:DIR``, ``cifar2:FILE`` or ``npz:FILE`` (docs/design.md, Command line).

    ``kwargs`` go to the loader (e.g. ``n_train``, ``binary_pm1`` for ``cifar2``).

    Raises:
      DatasetError: an unknown spec, or the loader's own errors.
    """
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return load_digits(seed=seed, **kwargs)
    if kind == "mnist" and arg:
        return load_mnist(arg, seed=seed, **kwargs)
    if kind == "cifar2" and arg:
        return load_cifar2(arg, seed=seed, **kwargs)
    if kind == "npz" and arg:
        return load_npz(arg)
    raise DatasetError(
        f"unknown dataset {spec!r}: use 'digits', 'mnist:DIR', 'cifar2:FILE' or 'npz:FILE'"
    )
