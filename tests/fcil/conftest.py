"""Shared fixtures of the FCIL driver tests: a small slice of the embedded MNIST and a tiny configuration."""

from __future__ import annotations

import lorm_testing
import numpy as np
import pytest
import torch

from lorm_ext.fcil.config import RunConfig
from lorm_ext.fcil.data import Dataset, TensorImages, load_dataset, split_tasks
from lorm_ext.fcil.driver import RunData, check
from lorm_ext.fcil.model import pretrain_on_digits


@pytest.fixture(scope="session")
def tiny_config():
    """lorm_testing.tiny_config: RunConfig(**overrides) of a tiny run."""
    return lorm_testing.tiny_config


@pytest.fixture(scope="session")
def digits_weights(tmp_path_factory) -> str:
    """A briefly pretrained embedded backbone (4 epochs; the real one has 40), as a local checkpoint file."""
    path = str(tmp_path_factory.mktemp("weights") / "digits-vit.safetensors")
    pretrain_on_digits(path, epochs=4)
    return path


@pytest.fixture(scope="session")
def mnist():
    config = lorm_testing.tiny_config()
    return load_dataset(config, check(config))


@pytest.fixture(scope="session")
def four_digits(mnist) -> Dataset:
    """Digits 0-3 of the embedded MNIST, 150 training and 20 test images each: two tasks of two classes."""

    def subset(images: TensorImages, per_class: int) -> TensorImages:
        keep = np.concatenate([np.flatnonzero(images.labels == c)[:per_class] for c in range(4)])
        return TensorImages(images.images[keep], images.labels[keep])

    return Dataset(subset(mnist.train, 150), subset(mnist.test, 20), num_classes=4, n_tasks=2)


@pytest.fixture
def tiny_data(four_digits):
    """RunData of the four digits for a configuration (its split; its weights file, if any)."""

    def make(config: RunConfig) -> RunData:
        return RunData(four_digits, split_tasks(four_digits, config), weights=config.pretrained_path)

    return make


@pytest.fixture(autouse=True)
def one_thread():
    """Runs compare bit for bit across processes that use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
