"""PNG plots: the accuracy matrix of a run, and the accuracy after each task of every strategy."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np


def _heatmap(ax, matrix: np.ndarray, title: str):
    """One accuracy matrix: rows = after training task i, columns = tested on task j; blank above the diagonal."""
    masked = np.ma.masked_invalid(matrix)
    image = ax.imshow(masked, cmap="viridis", vmin=0, vmax=100)
    for (i, j), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            ax.text(
                j, i, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black", fontsize=8
            )
    ticks = range(matrix.shape[0])
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set_xlabel("tested on task")
    ax.set_ylabel("after task")
    ax.set_title(title, fontsize=10)
    return image


def as_array(matrix: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)


def plot_accuracy_matrices(matrices: dict[str, np.ndarray], path: str, suptitle: str = "") -> None:
    """One heatmap per entry (a run, or a strategy's mean over seeds), side by side, one colour bar (0-100 %)."""
    fig, axes = plt.subplots(
        1, len(matrices), figsize=(3.2 * len(matrices) + 0.8, 3.6), squeeze=False, layout="constrained"
    )
    for ax, (title, matrix) in zip(axes[0], matrices.items()):
        image = _heatmap(ax, matrix, title)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy (%)", shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_after_tasks(curves: dict[str, list[list[float]]], path: str, title: str = "") -> None:
    """Accuracy on all classes seen so far after each task: per strategy the mean over runs, ± std shaded."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for strategy, runs in curves.items():
        values = np.array(runs, dtype=float)
        tasks = np.arange(1, values.shape[1] + 1)
        mean = values.mean(0)
        ax.plot(tasks, mean, marker="o", label=strategy)
        if len(runs) > 1:
            std = values.std(0, ddof=1)
            ax.fill_between(tasks, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.set_xticks(tasks)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
