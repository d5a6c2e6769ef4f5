"""The mislabel benchmark's pretrained CNN never sees a training record or a test-pool image."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from bench import attribution, mnist_cnn
from service_core import load_mnist

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.mark.skipif(
    not any(MNIST.glob("t10k-images-idx3-ubyte*")), reason="no MNIST in ../shared/data"
)
def test_the_pretraining_images_are_every_other_image(tmp_path, monkeypatch):
    seen = {}

    def pretrain(x, y, epochs):
        seen.update(x=np.asarray(x), y=np.asarray(y), epochs=epochs)
        return mnist_cnn.init()

    monkeypatch.setattr(mnist_cnn, "pretrain", pretrain)
    mnist = load_mnist(MNIST, seed=0, train_per_class=20, test_per_class=40)
    args = argparse.Namespace(mnist_dir=str(MNIST), mislabel_per_class=20, out=tmp_path)
    images, extra = attribution._pretrained_cnn(args, mnist, log=lambda *_: None)

    x = seen["x"].reshape(len(seen["x"]), -1)
    assert len(x) == 10_000 - 200 - 400 and seen["epochs"] == attribution.PRETRAIN_EPOCHS
    used = {row.tobytes() for row in np.concatenate([mnist.x, mnist.x_test])}
    assert not any(row.tobytes() in used for row in x)
    # labels are the images' own: the same image in the full split carries the same label
    full = load_mnist(MNIST, seed=0, train_per_class=None, test_per_class=None)
    label_of = {row.tobytes(): label for row, label in zip(full.x, full.y, strict=True)}
    assert all(label_of[row.tobytes()] == label for row, label in zip(x, seen["y"], strict=True))
    assert images.x.shape == (200, 28, 28, 1) and np.array_equal(images.y, mnist.y)
    model = extra["model"]
    assert model.kind == "user" and model.trainable == "^head/"
    assert Path(model.params).exists() and model.network.endswith("mnist_cnn.py:net")
