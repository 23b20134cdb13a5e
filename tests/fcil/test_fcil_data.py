"""Data: the Dirichlet split's properties, the on-disk readers (CIFAR-100 archive, image folder), class order."""

from __future__ import annotations

import fnmatch
import io
import json
import os
import pickle
import re
import tarfile

import numpy as np
import pytest
import torch
from lorm_testing import RunsCode

from lorm_ext.fcil import data
from lorm_ext.fcil.config import ConfigError
from lorm_ext.fcil.data import InputSpec, load_dataset, split_task, split_tasks, split_to_json, to_channels
from lorm_ext.fcil.protocol import participants


def test_the_packaged_mnist_is_the_recorded_sample(mnist):
    """The embedded default ships with the package: the arrays the results were made with (content hash), 400 ± 50
    training images per class and the official test set's class counts, found by the package-data glob."""
    with np.load(data.EMBEDDED_MNIST, allow_pickle=False) as file:
        arrays = {name: file[name] for name in file.files}
    assert sorted(arrays) == sorted(data.MNIST_ARRAYS)
    assert data.mnist_content_sha256(arrays) == data.MNIST_CONTENT_SHA256
    assert arrays["train_images"].shape == (4000, 28, 28) and arrays["test_images"].shape == (10000, 28, 28)
    assert all(a.dtype == np.uint8 for a in arrays.values())
    assert np.all(np.abs(np.bincount(arrays["train_labels"]) - 400) <= 50)
    official_test_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(arrays["test_labels"]).tolist() == official_test_counts
    assert len(mnist.train) == 4000 and len(mnist.test) == 10000 and mnist.num_classes == 10
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "pyproject.toml"), "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["lorm_ext.fcil"]
    relative = os.path.relpath(data.EMBEDDED_MNIST, os.path.dirname(data.__file__))
    assert any(fnmatch.fnmatch(relative, g) for g in globs)


def test_a_missing_packaged_mnist_is_a_clear_error(monkeypatch, tiny_config):
    monkeypatch.setattr(data, "EMBEDDED_MNIST", "/no/such/mnist.npz")
    data._mnist_arrays.cache_clear()
    try:
        with pytest.raises(
            ConfigError, match="the embedded MNIST '/no/such/mnist.npz' is missing from the installation"
        ):
            load_dataset(tiny_config(), InputSpec(1, 8, (0.5,), (0.5,)))
    finally:
        data._mnist_arrays.cache_clear()


def test_split_uses_every_sample_once_and_gives_each_client_six(mnist, tiny_config):
    config = tiny_config(num_clients=10, distribution_alpha=0.1, n_tasks=5)
    splits = split_tasks(mnist, config)
    for task, split in enumerate(splits):
        classes = mnist.task_classes(task)
        for held, labels in ((split.train, mnist.train.labels), (split.test, mnist.test.labels)):
            everything = np.concatenate(held)
            assert len(everything) == len(np.unique(everything))  # nobody shares a sample
            assert set(everything) == set(np.flatnonzero(np.isin(labels, classes)))  # every sample of the task
            assert np.isin(labels[everything], classes).all()
        assert min(split.num_train) >= 6


def test_split_skew_follows_beta(mnist):
    """β large: every client close to 1/K of each class; β small: most of a class on few clients."""
    labels = mnist.train.labels
    classes = np.arange(10)
    uniform = split_task(labels, mnist.test.labels, classes, 5, 1e4, np.random.default_rng(0))
    shares = np.array([[np.mean(labels[idx] == c) for idx in uniform.train] for c in classes])
    counts = np.array([len(idx) for idx in uniform.train])
    assert np.abs(counts / counts.sum() - 0.2).max() < 0.03
    assert np.abs(shares - 0.1).max() < 0.03
    skewed = split_task(labels, mnist.test.labels, classes, 5, 0.1, np.random.default_rng(0))
    top_share = [max(np.sum(labels[idx] == c) for idx in skewed.train) / np.sum(labels == c) for c in classes]
    assert np.mean(top_share) > 0.6


def test_test_split_follows_the_training_shares(mnist, tiny_config):
    split = split_tasks(mnist, tiny_config(num_clients=4, distribution_alpha=0.3, n_tasks=5))[0]
    for c in mnist.task_classes(0):
        train = np.array([np.sum(mnist.train.labels[idx] == c) for idx in split.train])
        test = np.array([np.sum(mnist.test.labels[idx] == c) for idx in split.test])
        assert np.abs(test - test.sum() * train / train.sum()).max() < 1  # largest-remainder rounding


def test_split_is_seeded(mnist, tiny_config):
    one, again = (split_tasks(mnist, tiny_config(seed=3)) for _ in range(2))
    other = split_tasks(mnist, tiny_config(seed=4))
    assert all(np.array_equal(a, b) for s, t in zip(one, again) for a, b in zip(s.train, t.train))
    assert not all(np.array_equal(a, b) for s, t in zip(one, other) for a, b in zip(s.train, t.train))


def test_impossible_split_is_a_clear_error(mnist):
    with pytest.raises(ConfigError, match="larger β or fewer clients"):
        split_task(mnist.train.labels, mnist.test.labels, np.arange(2), 60, 0.01, np.random.default_rng(0))


def test_participation_is_per_task_and_seeded(tiny_config):
    config = tiny_config(num_clients=10, participation_rate=0.5)
    chosen = [participants(config, task) for task in range(4)]
    assert all(len(c) == 5 and c == sorted(c) for c in chosen)
    assert chosen == [participants(config, task) for task in range(4)]
    assert len({tuple(c) for c in chosen}) > 1


def test_permuted_class_order_relabels_consistently(mnist, tiny_config):
    config = tiny_config(class_order="permuted", seed=1)
    spec = InputSpec(1, 16, (0.5,), (0.5,))
    permuted = load_dataset(config, spec)
    mapping = {int(a): int(b) for a, b in zip(mnist.train.labels, permuted.train.labels)}
    assert sorted(mapping) == sorted(mapping.values()) == list(range(10)) and mapping != dict(zip(range(10), range(10)))
    assert all(mapping[int(a)] == int(b) for a, b in zip(mnist.test.labels, permuted.test.labels))


def _cifar100_batch(n: int, seed: int = 0) -> dict:
    """A python batch as the archive holds it: n images per class, random pixels."""
    labels = np.repeat(np.arange(100), n)
    pixels = np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    return {b"data": pixels, b"fine_labels": labels.tolist()}


def _archive(path: str, blobs: dict[str, bytes]) -> None:
    """A .tar.gz holding each blob as cifar-100-python/<split>."""
    with tarfile.open(path, "w:gz") as archive:
        for split, blob in blobs.items():
            info = tarfile.TarInfo(f"cifar-100-python/{split}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))


def _fake_cifar100(path: str, per_class: dict[str, int]) -> None:
    """The standard python archive's layout and pickles, with random pixels."""
    _archive(path, {split: pickle.dumps(_cifar100_batch(n)) for split, n in per_class.items()})


def test_cifar100_archive_and_folder(tmp_path, tiny_config):
    archive = str(tmp_path / "cifar-100-python.tar.gz")
    _fake_cifar100(archive, {"train": 3, "test": 1})
    spec = InputSpec(3, 24, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    data = load_dataset(tiny_config(dataset="cifar100", data_path=archive, n_tasks=None), spec)
    assert (len(data.train), len(data.test), data.num_classes, data.n_tasks) == (300, 100, 100, 10)
    torch.manual_seed(0)
    assert data.train.batch(np.arange(4), train=True).shape == (4, 3, 24, 24)
    assert data.test.batch(np.arange(4), train=False).dtype == torch.float32
    grey = load_dataset(tiny_config(dataset="cifar100", data_path=archive), InputSpec(1, 24, (0.5,), (0.5,)))
    assert grey.train.batch(np.arange(4), train=True).shape == (4, 1, 24, 24)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    extracted = load_dataset(tiny_config(dataset="cifar100", data_path=str(tmp_path)), spec)
    assert np.array_equal(extracted.train.labels, data.train.labels)


def test_cifar100_archive_is_unpickled_without_running_code(tmp_path, tiny_config):
    spec = InputSpec(3, 24, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    marker = tmp_path / "ran"
    test_blob = pickle.dumps(_cifar100_batch(1))
    for call, args, name in [
        (os.system, (f"touch {marker}",), f"{os.system.__module__}.system"),
        (exec, (f"open({str(marker)!r}, 'w')",), "builtins.exec"),
    ]:
        archive = str(tmp_path / f"evil-{name}.tar.gz")
        batch = {**_cifar100_batch(3), b"batch_label": RunsCode(call, *args)}
        _archive(archive, {"train": pickle.dumps(batch), "test": test_blob})
        with pytest.raises(ConfigError, match=re.escape(f"{archive}:cifar-100-python/train: refused to load {name}")):
            load_dataset(tiny_config(dataset="cifar100", data_path=archive), spec)
        assert not marker.exists()
    folder = tmp_path / "extracted" / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "train").write_bytes(pickle.dumps(RunsCode(os.system, f"touch {marker}")))
    with pytest.raises(ConfigError, match=re.escape(f"{folder / 'train'}: refused to load")):
        load_dataset(tiny_config(dataset="cifar100", data_path=str(folder.parent)), spec)
    assert not marker.exists()

    # what the restricted unpickler admits: NumPy 1 module names (the archive's, here with protocol 3, whose
    # bytes need no other global) and NumPy 2's, with pickle protocols 3 to 5
    batch = _cifar100_batch(2)
    blobs = {protocol: pickle.dumps(batch, protocol=protocol) for protocol in (3, 4, 5)}
    numpy1 = blobs[3].replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")
    assert numpy1 != blobs[3]
    for blob in [numpy1, *blobs.values()]:
        archive = str(tmp_path / "good.tar.gz")
        _archive(archive, {"train": blob, "test": test_blob})
        data = load_dataset(tiny_config(dataset="cifar100", data_path=archive), spec)
        assert np.array_equal(data.train.labels, np.asarray(batch[b"fine_labels"]))
        assert torch.equal(data.train.source, torch.from_numpy(batch[b"data"]).reshape(-1, 3, 32, 32))


@pytest.mark.parametrize(
    "blob,problem",
    [
        (pickle.dumps(_cifar100_batch(1))[:-100], "not a readable CIFAR-100 python batch (UnpicklingError"),
        (b"", "not a readable CIFAR-100 python batch (EOFError"),
        (pickle.dumps({b"fine_labels": [0]}), "not a CIFAR-100 python batch (no b'data' array"),
        (pickle.dumps({**_cifar100_batch(1), b"fine_labels": list(range(1, 101))[::-1] + [0]}), "is not 100 integers"),
        (pickle.dumps({**_cifar100_batch(1), b"fine_labels": [100] * 100}), "fine labels outside [0, 100)"),
        (pickle.dumps([1, 2]), "not a CIFAR-100 python batch"),
    ],
    ids=["truncated", "empty", "no data", "too many labels", "label 100", "a list"],
)
def test_a_corrupt_cifar100_batch_is_a_one_line_error_naming_it(tmp_path, tiny_config, blob, problem):
    archive = str(tmp_path / "cifar-100-python.tar.gz")
    _archive(archive, {"train": blob, "test": pickle.dumps(_cifar100_batch(1))})
    with pytest.raises(
        ConfigError, match=re.escape(f"{archive}:cifar-100-python/train: ") + ".*" + re.escape(problem)
    ) as error:
        load_dataset(tiny_config(dataset="cifar100", data_path=archive), InputSpec(3, 24, (0.5,) * 3, (0.5,) * 3))
    assert "\n" not in str(error.value)


def test_a_file_that_is_not_a_tar_archive_is_named(tmp_path, tiny_config):
    path = tmp_path / "cifar-100-python.tar.gz"
    path.write_bytes(b"not a tar file")
    with pytest.raises(ConfigError, match=re.escape(f"{str(path)!r} is not the CIFAR-100 archive (not a readable tar")):
        load_dataset(tiny_config(dataset="cifar100", data_path=str(path)), InputSpec(3, 24, (0.5,) * 3, (0.5,) * 3))


def test_image_folder_with_and_without_split(tmp_path, tiny_config):
    from PIL import Image

    for c in ("cat", "dog", "eel"):
        for split, count in (("train", 4), ("test", 2)):
            folder = tmp_path / "split" / split / c
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 30), (i * 40, 0, 0)).save(folder / f"{i}.png")
        flat = tmp_path / "flat" / c
        flat.mkdir(parents=True)
        for i in range(5):
            Image.new("L", (12, 12), i * 50).save(flat / f"{i}.jpg")
    spec = InputSpec(3, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    split = load_dataset(tiny_config(dataset="imagefolder", data_path=str(tmp_path / "split"), n_tasks=3), spec)
    assert (len(split.train), len(split.test), split.num_classes) == (12, 6, 3)
    assert split.train.batch(np.arange(3), train=True).shape == (3, 3, 16, 16)
    flat = load_dataset(tiny_config(dataset="imagefolder", data_path=str(tmp_path / "flat"), n_tasks=1), spec)
    assert (len(flat.train), len(flat.test)) == (12, 3)  # one image in five of each class for testing
    with pytest.raises(ConfigError, match="cannot form 2 tasks"):
        load_dataset(tiny_config(dataset="imagefolder", data_path=str(tmp_path / "flat"), n_tasks=2), spec)
    grey = InputSpec(1, 16, (0.5,), (0.5,))  # a 1-channel backbone (the embedded one) reads RGB files as grey
    grey_split = load_dataset(tiny_config(dataset="imagefolder", data_path=str(tmp_path / "split"), n_tasks=3), grey)
    assert grey_split.test.batch(np.arange(3), train=False).shape == (3, 1, 16, 16)
    os.makedirs(tmp_path / "empty" / "c")
    with pytest.raises(ConfigError, match="no images"):
        load_dataset(tiny_config(dataset="imagefolder", data_path=str(tmp_path / "empty")), spec)


def test_to_channels_converts_grey_and_rgb_and_rejects_the_rest():
    rgb = torch.rand(2, 3, 4, 5)
    grey = to_channels(rgb, 1)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert grey.shape == (2, 1, 4, 5) and torch.allclose(grey[:, 0], luma, atol=1e-3)
    repeated = to_channels(grey, 3)
    assert repeated.shape == (2, 3, 4, 5) and all(torch.equal(repeated[:, c], grey[:, 0]) for c in range(3))
    assert to_channels(rgb, 3) is rgb
    with pytest.raises(ValueError, match="2-channel images to a backbone with 3 input channels"):
        to_channels(torch.rand(2, 2, 4, 5), 3)


def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_split_file_round_trip(mnist, tiny_config, tmp_path):
    """What a run writes (split_to_json) is read back as the same split, whatever the seed says."""
    config = tiny_config(num_clients=4, distribution_alpha=0.3, seed=2)
    splits = split_tasks(mnist, config)
    path = _write(tmp_path / "split.json", split_to_json(mnist, splits))
    read = split_tasks(mnist, tiny_config(num_clients=4, seed=9, split_file=path))
    for mine, theirs in zip(splits, read, strict=True):
        for part in ("train", "test"):
            assert all(np.array_equal(a, b) for a, b in zip(getattr(mine, part), getattr(theirs, part), strict=True))
    assert split_to_json(mnist, read) == split_to_json(mnist, splits)


def _spoil(data: dict, how: str) -> dict | str:
    task = data["tasks"][1]  # digits 5-9
    if how == "not json":
        return "{tasks: ["
    if how == "format":
        data["format"] = "other"
    elif how == "size":
        data["train_size"] += 1
    elif how == "tasks":
        data["tasks"].pop()
    elif how == "classes":
        task["classes"] = [0, 1]
    elif how == "clients":
        task["train"].pop()
    elif how == "range":
        task["test"][2].append(10**6)
    elif how == "foreign class":
        task["train"][0].append(data["tasks"][0]["train"][0][0])
    elif how == "twice":
        task["train"][1].append(task["train"][0][0])
    elif how == "empty":
        task["train"][3] = []
    elif how == "not integers":
        task["train"][0][0] = 1.5
    return data


@pytest.mark.parametrize(
    "how, message",
    [
        ("not json", "cannot read it as JSON"),
        ("format", "format: expected an object"),
        ("size", "train_size: 4001, but the data set has 4000"),
        ("tasks", r"tasks: expected a list of 2 tasks \(--n_tasks\)"),
        ("classes", r"task 1 classes: expected \[5, 6, 7, 8, 9\]"),
        ("clients", r"task 1 train: expected one index list per client \(4, --num_clients\)"),
        ("range", r"task 1 test client 2: index out of range \[0, 10000\)"),
        ("foreign class", "task 1 train client 0: holds samples of classes outside the task"),
        ("twice", "task 1 train: a sample is listed twice"),
        ("empty", r"task 1 train: clients \[3\] have no training samples"),
        ("not integers", "task 1 train client 0: expected a list of integers"),
    ],
)
def test_bad_split_file_is_a_clear_error(mnist, tiny_config, tmp_path, how, message):
    config = tiny_config(num_clients=4)
    data = _spoil(split_to_json(mnist, split_tasks(mnist, config)), how)  # 2 tasks of 5 digits
    path = tmp_path / "split.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ConfigError, match=f"--split_file '{re.escape(str(path))}': {message}"):
        split_tasks(mnist, tiny_config(num_clients=4, split_file=str(path)))


def test_the_authors_published_imagenet_r_split_is_read_when_present(tmp_path, tiny_config):
    """Their two YAML files (paths from another machine, re-rooted by <class>/<file>; their targets) win over the
    drawn 80/20 split; a file naming a missing image is a clear error."""
    import yaml
    from PIL import Image

    root = tmp_path / "imagenet-r"
    for c in ("n01", "n02"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(root / c / f"art_{i}.jpg")
    train = {"data": [f"/their/disk/imagenet-r/{c}/art_{i}.jpg" for c in ("n02", "n01") for i in (0, 1)],
             "targets": [1, 1, 0, 0]}  # fmt: skip
    test = {"data": ["/their/disk/imagenet-r/n01/art_2.jpg", "/their/disk/imagenet-r/n02/art_2.jpg"], "targets": [0, 1]}
    for name, entries in zip(("imagenet-r_train.yaml", "imagenet-r_test.yaml"), (train, test)):
        (root / name).write_text(yaml.safe_dump(entries))
    spec = InputSpec(3, 8, (0.5,) * 3, (0.5,) * 3)
    data = load_dataset(tiny_config(dataset="imagefolder", data_path=str(root), n_tasks=2), spec)
    assert data.train.source == [str(root / c / f"art_{i}.jpg") for c in ("n02", "n01") for i in (0, 1)]
    assert data.train.labels.tolist() == [1, 1, 0, 0] and data.test.labels.tolist() == [0, 1]
    assert (len(data.train), len(data.test), data.num_classes) == (4, 2, 2)
    os.remove(root / "n02" / "art_2.jpg")
    with pytest.raises(ConfigError, match=r"imagenet-r_test.yaml' lists 1 images missing under .*n02/art_2.jpg"):
        load_dataset(tiny_config(dataset="imagefolder", data_path=str(root), n_tasks=2), spec)
    (root / "imagenet-r_train.yaml").write_text("data: [1, 2")
    with pytest.raises(ConfigError, match="imagenet-r_train.yaml': not the authors' split file"):
        load_dataset(tiny_config(dataset="imagefolder", data_path=str(root), n_tasks=2), spec)
