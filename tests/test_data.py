"""Data loaders: digits split and ids, user .npz files, MNIST IDX files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service_core import DatasetError, load_dataset, load_digits, load_mnist, load_npz

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def test_digits_split_and_ids(digits):
    assert digits.n == 1437 and digits.x_test.shape == (360, 64)
    assert digits.ids[0].startswith("digits-") and len(set(digits.ids)) == digits.n
    assert 0.0 <= digits.x.min() and digits.x.max() <= 1.0
    assert set(np.unique(digits.y)) == set(range(10))
    again = load_digits(seed=0)
    assert np.array_equal(again.ids, digits.ids)
    other = load_digits(seed=1)
    assert not np.array_equal(other.ids, digits.ids)
    # train and test are disjoint: no test image equals a training image at the same id
    train_index = {int(i.split("-")[1]) for i in digits.ids}
    assert len(train_index) == 1437


def test_npz_loader(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    np.savez(
        tmp_path / "labels.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]), ids=np.array(list("abcdef"))
    )
    ds = load_npz(tmp_path / "labels.npz")
    assert ds.task == "classification" and ds.output_dim == 3 and ds.ids.tolist() == list("abcdef")
    np.savez(tmp_path / "reg.npz", x=x, y=np.ones((6, 2), np.float64))
    ds = load_dataset(f"npz:{tmp_path / 'reg.npz'}")
    assert ds.task == "regression" and ds.output_dim == 2 and ds.ids[0] == "reg-000000"
    np.savez(tmp_path / "dup.npz", x=x, y=np.zeros(6, int), ids=np.array(list("abcdea")))
    with pytest.raises(DatasetError, match="a"):
        load_npz(tmp_path / "dup.npz")
    np.savez(tmp_path / "nan.npz", x=np.full((2, 2), np.nan), y=np.zeros(2, int))
    with pytest.raises(DatasetError, match="NaN"):
        load_npz(tmp_path / "nan.npz")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("cifar100")


@pytest.mark.skipif(not (SHARED / "mnist").exists(), reason="../shared/data/mnist is absent")
def test_mnist_idx_loader():
    ds = load_mnist(SHARED / "mnist", seed=0, train_per_class=20, test_per_class=10)
    assert ds.x.shape == (200, 784) and ds.x_test.shape == (100, 784)
    assert np.bincount(ds.y).tolist() == [20] * 10
    assert not set(ds.ids) & {f"mnist-t10k-{i:05d}" for i in range(0)}
    assert 0 <= ds.x.min() and ds.x.max() <= 1.0 and ds.x.max() > 0.9


def test_a_data_set_with_an_id_longer_than_256_characters_does_not_load(tmp_path):
    """Ids are held in fixed-width arrays; the API refuses longer ones, and so does a data set."""
    path = tmp_path / "long.npz"
    ids = np.array(["a", "b" * 257, "c"])
    np.savez(path, x=np.zeros((3, 2), np.float32), y=np.array([0, 1, 0]), ids=ids)
    with pytest.raises(DatasetError, match="1 id.s. are longer than 256 characters"):
        load_npz(path)
    np.savez(path, x=np.zeros((3, 2), np.float32), y=np.array([0, 1, 0]), ids=ids.astype("U256"))
    assert max(map(len, load_npz(path).ids)) == 256
