"""Why every strategy recognises the last task's digits so rarely right after learning it (docs/fcil.md).

For each finished run folder given (it needs the run's adapters.safetensors, which stay out of git: make them
with the commands of results/README.md), two measurements on the final model:

1. Head row sums. With cross-entropy on the current task's logits only, the gradients of a task's logits sum
   to zero over the task's classes, so the sum of the task's head rows (and biases) gets a zero gradient. With
   2 classes per task AdamW keeps it too (the two rows' gradients are opposite, so are their Adam steps), and
   RegMean and sample-weighted averaging are linear maps that preserve a sum every client shares. Printed: the
   largest change of a task's row sum (weights and bias) between the initial head and the final one, next to
   the largest change of a single row.
2. Own update against the evaluated update. The last task's head is trained on W0 + B_T A_T alone, but the
   evaluated model adds the mean of all task updates (the baselines) or the cross-task merge (LoRM). Printed:
   the last task's test accuracy over all classes (class-IL) and over its own classes (task-IL), through the
   evaluated model and through W0 + B_T A_T with the same head.

    python results/last_task_collapse.py RUN_FOLDER [RUN_FOLDER ...]
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors import safe_open

from lorm_ext.fcil.config import RunConfig
from lorm_ext.fcil.data import batches
from lorm_ext.fcil.driver import prepare, task_test_sets
from lorm_ext.fcil.model import build_model

torch.set_num_threads(1)


@torch.no_grad()
def accuracies(model, dataset, tensors, indices, classes) -> tuple[float, float]:
    """(class-IL over the classes seen by the end, task-IL over ``classes``) on the test ``indices``."""
    model.load({k: v for k, v in tensors.items() if k.startswith("head/")})
    model.vit.eval()
    deltas = {k.removeprefix("delta/"): v for k, v in tensors.items() if k.startswith("delta/")}
    logits = []
    with model.dense(deltas):
        for x, _ in batches(dataset.test, indices, 256, train=False):
            logits.append(model.vit(x))
    logits, labels = torch.cat(logits), torch.from_numpy(dataset.test.labels[indices])
    class_il = (logits.argmax(1) == labels).float().mean().item()
    task_il = (logits[:, classes].argmax(1) == labels - classes[0]).float().mean().item()
    return 100 * class_il, 100 * task_il


print("| run | classes/task | row-sum change (W, b) | largest row change | last task class-IL: evaluated / own update "
      "| task-IL: evaluated / own update |")  # fmt: skip
print("|---|---|---|---|---|---|")
for folder in sys.argv[1:]:
    with open(os.path.join(folder, "config.json")) as file:
        config = RunConfig.from_json(json.load(file))
    data = prepare(config)
    dataset = data.dataset
    model = build_model(config, dataset.num_classes, data.weights)  # seeded: the run's initial head
    initial = {k: v.detach().clone() for k, v in model.head_parameters().items()}
    with safe_open(os.path.join(folder, "adapters.safetensors"), "pt") as file:
        final = {k: file.get_tensor(k) for k in file.keys()}
        scaling = float(file.metadata()["lora_scaling"])
    sum_change, row_change = 0.0, 0.0
    for t in range(dataset.n_tasks):
        rows = dataset.task_classes(t)
        for name in ("weight", "bias"):
            change = final[f"head/{name}"][rows] - initial[name][rows]
            sum_change = max(sum_change, change.sum(0).abs().max().item())
            row_change = max(row_change, change.abs().max().item())
    last = dataset.n_tasks - 1
    own = {k: v for k, v in final.items() if k.startswith("head/")} | {
        f"delta/{n}": scaling * final[f"task{last}/B/{n}"] @ final[f"task{last}/A/{n}"] for n in model.layers
    }
    indices = task_test_sets(data.splits)[last]
    classes = dataset.task_classes(last).tolist()
    evaluated = accuracies(model, dataset, final, indices, classes)
    alone = accuracies(model, dataset, own, indices, classes)
    print(f"| {folder} | {dataset.classes_per_task} | {sum_change:.1e} | {row_change:.2f} | {evaluated[0]:.1f} / "
          f"{alone[0]:.1f} | {evaluated[1]:.1f} / {alone[1]:.1f} |")  # fmt: skip
