"""The seed-0 table of several run folders side by side (the first is the reference), and how far each run's final
tensors are from the reference's (largest ‖X − X_ref‖_F / ‖X_ref‖_F over adapters.safetensors, which stays out of
git: make the folders with the commands of results/README.md).

    python results/kernel_spread.py results/embedded-beta0.5 results/kernel-spread/native results/kernel-spread/avx2
"""

from __future__ import annotations

import json
import os
import sys

from safetensors.torch import load_file

folders = sys.argv[1:]
names = " / ".join(os.path.basename(f.rstrip("/")) for f in folders)
print(f"| strategy | final acc: {names} | avg incremental acc: {names} | largest relative tensor difference from "
      f"{os.path.basename(folders[0].rstrip('/'))} |")  # fmt: skip
print("|---|---|---|---|")
for strategy in ("lorm", "fedit", "ffa-lora", "lora-fair", "centralized"):
    runs = [os.path.join(folder, strategy, "seed0") for folder in folders]
    summaries = [json.load(open(os.path.join(run, "results.json")))["summary"] for run in runs]
    tensors = [load_file(os.path.join(run, "adapters.safetensors")) for run in runs]
    reference = tensors[0]
    spread = [
        max(float((t[k] - v).norm() / v.norm().clamp_min(1e-30)) for k, v in reference.items()) for t in tensors[1:]
    ]
    keys = ("final_accuracy_weighted", "average_incremental_accuracy")
    cells = [" / ".join(f"{s[key]:.2f}" for s in summaries) for key in keys]
    print(f"| {strategy} | {cells[0]} | {cells[1]} | {', '.join(f'{d:.1e}' for d in spread)} |")
