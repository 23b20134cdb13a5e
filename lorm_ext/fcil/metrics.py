"""Class-incremental metrics from per-task correct counts, and the comparison table.

``correct[i][j]`` / ``total[j]``: test samples of task j classified right after training task i (j ≤ i), over
all classes seen so far. Accuracies in percent.

- final accuracy, sample-weighted (the authors' "mean accuracy up to task") and as the mean over tasks;
- average incremental accuracy: the mean over i of the sample-weighted accuracy after task i;
- forgetting, averaged over the tasks but the last: ``forgetting_last`` = a[j][j] − a[T−1][j] (fed-mammoth's
  compute_forgetting; their plot also averages in the last task's 0, i.e. × (T−1)/T) and ``forgetting_max`` =
  max over i < T−1 of a[i][j] − a[T−1][j] (Chaudhry et al., 2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy_matrix(correct: Sequence[Sequence[int]], total: Sequence[int]) -> list[list[float | None]]:
    """a[i][j] in percent for j ≤ i, None above the diagonal."""
    return [[100.0 * c / total[j] if j <= i else None for j, c in enumerate(row)] for i, row in enumerate(correct)]


def seen_accuracy(correct_row: Sequence[int], total: Sequence[int], seen_tasks: int) -> float:
    """Sample-weighted accuracy over the first ``seen_tasks`` tasks."""
    return 100.0 * sum(correct_row[:seen_tasks]) / sum(total[:seen_tasks])


def summarize(correct: Sequence[Sequence[int]], total: Sequence[int]) -> dict[str, float | None]:
    a = accuracy_matrix(correct, total)
    last = len(a) - 1
    earlier = range(last)
    return {
        "final_accuracy_weighted": seen_accuracy(correct[last], total, last + 1),
        "final_accuracy_task_mean": float(np.mean(a[last][: last + 1])),
        "average_incremental_accuracy": float(
            np.mean([seen_accuracy(correct[i], total, i + 1) for i in range(last + 1)])
        ),
        "forgetting_last": float(np.mean([a[j][j] - a[last][j] for j in earlier])) if last else None,
        "forgetting_max": float(np.mean([max(a[i][j] for i in range(j, last)) - a[last][j] for j in earlier]))
        if last
        else None,
    }


def mean_std(values: Sequence[float | None], fmt: str, std_fmt: str | None = None) -> str:
    """ "mean ± sample standard deviation" over several values (``std_fmt``: the std's format, default ``fmt``),
    the value alone for one (one seed has no spread), "–" when any value is missing."""
    if not values or any(v is None for v in values):
        return "–"
    mean = fmt.format(float(np.mean(values)))
    return f"{mean} ± {(std_fmt or fmt).format(float(np.std(values, ddof=1)))}" if len(values) > 1 else mean


TABLE_COLUMNS = (
    ("final_accuracy_weighted", "final acc (weighted)", "{:.2f}"),
    ("final_accuracy_task_mean", "final acc (task mean)", "{:.2f}"),
    ("average_incremental_accuracy", "avg incremental acc", "{:.2f}"),
    ("forgetting_last", "forgetting (last)", "{:.2f}"),
    ("forgetting_max", "forgetting (max)", "{:.2f}"),
    ("kib_up_per_round", "KiB up/round", "{:.1f}"),
    ("seconds", "time (s)", "{:.0f}"),
)


def comparison_table(results: dict[str, list[dict]]) -> str:
    """Markdown table, one row per strategy: mean ± std over its runs (seeds) of each column (``mean_std``)."""
    header = "| strategy | runs | " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for strategy, runs in results.items():
        cells = [mean_std([run["summary"][key] for run in runs], fmt) for key, _, fmt in TABLE_COLUMNS]
        lines.append(f"| {strategy} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


WIN_COLUMNS = (("final_accuracy_weighted", "final acc"), ("average_incremental_accuracy", "avg incremental acc"))


def wins_table(results: dict[str, list[dict]], reference: str = "lorm") -> str:
    """Markdown table, one row per other strategy: over the seeds both ran (identical splits), how often
    ``reference`` is ahead / level / behind, and the mean ± std of its lead, per column of WIN_COLUMNS."""
    if reference not in results or len(results) < 2:
        return ""
    mine = {run["seed"]: run["summary"] for run in results[reference]}
    titles = " | ".join(f"{title}: ahead/level/behind | {title}: lead" for _, title in WIN_COLUMNS)
    lines = [f"| {reference} vs | seeds | {titles} |", "|" + "---|" * (2 + 2 * len(WIN_COLUMNS))]
    for strategy, runs in results.items():
        if strategy == reference:
            continue
        theirs = {run["seed"]: run["summary"] for run in runs if run["seed"] in mine}
        cells = []
        for key, _ in WIN_COLUMNS:
            leads = [mine[seed][key] - summary[key] for seed, summary in theirs.items()]
            counts = [sum(d > 0 for d in leads), sum(d == 0 for d in leads), sum(d < 0 for d in leads)]
            cells += ["/".join(map(str, counts)), mean_std(leads, "{:+.2f}", "{:.2f}")]
        lines.append(f"| {strategy} | {len(theirs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
