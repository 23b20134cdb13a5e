"""How far the authors' precision for the cross-task merge and the head is from lorm_ext's float64 solves.

fed-mammoth's LoRM (``_models/lorm.py``) solves the cross-task merge ΔW = (Σ_t B_t A_t G_t)(Σ_t G_t)⁺ with the
running sums in the Grams' dtype (float32 with ``--gram_dtype 32``, as every published command) and
``torch.pinverse`` at its default rcond 1e-15, and the head's RegMean W = (Σ_k W_k G_k)(Σ_k G_k)⁻¹ in float64
with ``torch.inverse``. lorm_ext accumulates and solves both in float64 (``RegMeanMerger``, a pseudo-inverse).

The Grams are the real ones of the embedded run: the inputs of every adapted layer of the packaged digits-vit
over each task's training digits (seed 0, β = 0.5, all clients pooled, as the server's sums are), shrunk by
α_backbone ∈ {0 (diagonal, the authors' published setting), 0.5, 1 (full)}; the task updates B_t A_t (r = 4)
and the clients' heads are random, because both errors depend on the Grams' conditioning, not on the factors.
Printed: per α, the largest relative difference over layers, ‖ΔW_authors − ΔW_lorm_ext‖_F / ‖ΔW_lorm_ext‖_F, and
the same for the layer's output change on the task data, ‖X (ΔW_a − ΔW_l)ᵀ‖_F / ‖X ΔW_lᵀ‖_F; for the head the
relative difference of W, and what torch.inverse does with a head Gram that is singular.

    python results/authors_precision.py      # about a minute on one core; prints the table of docs/fcil.md
"""

from __future__ import annotations

import numpy as np
import torch

from lorm_ext import GramCollector, RegMeanMerger, shrink_gram
from lorm_ext.fcil.config import RunConfig
from lorm_ext.fcil.data import batches
from lorm_ext.fcil.driver import prepare
from lorm_ext.fcil.model import build_model

torch.set_num_threads(1)
config = RunConfig()
data = prepare(config)
model = build_model(config, data.dataset.num_classes, data.weights)
model.vit.eval()
generator = torch.Generator().manual_seed(0)


def task_grams(task: int) -> dict[str, torch.Tensor]:
    """Full float64 Grams of every adapted layer's and the head's inputs over the task's training data."""
    indices = np.sort(np.concatenate(data.splits[task].train))
    with torch.no_grad(), GramCollector(model.vit, dtype=torch.float64) as collector:
        for x, _ in batches(data.dataset.train, indices, 256, train=False):
            model.vit(x)
    return collector.shrunk(1.0)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


grams = [task_grams(t) for t in range(data.dataset.n_tasks)]
layers = list(model.layers)
r = config.r
print("cross-task merge, 5 tasks, largest relative difference over the 16 adapted layers")
print("| α_backbone | ΔW (Frobenius) | layer output on the data |")
print("|---|---|---|")
for alpha in (0.0, 0.5, 1.0):
    worst_w, worst_out = 0.0, 0.0
    ours = RegMeanMerger()
    authors_num: dict[str, torch.Tensor] = {}
    authors_den: dict[str, torch.Tensor] = {}
    updates = []
    for t, g in enumerate(grams):
        shrunk = {n: shrink_gram(g[n], alpha) for n in layers}
        b = {n: torch.randn(model.layers[n].out_features, r, generator=generator) for n in layers}
        a = {n: torch.randn(r, model.layers[n].in_features, generator=generator) for n in layers}
        updates.append((b, a))
        # lorm_ext: as the LoRM server's task end (lefts = B_t, factors = A_t), float64 sums and solve
        sent = {n: (s.diagonal() if alpha == 0 else s).to(torch.float32) for n, s in shrunk.items()}  # as clients
        ours.add_client(a, sent, lefts=b)
        for n in layers:  # the authors: float32 B @ A @ G and Σ G
            g32 = shrunk[n].to(torch.float32)
            term = b[n] @ a[n] @ g32
            authors_num[n] = term if t == 0 else authors_num[n] + term
            authors_den[n] = g32 if t == 0 else authors_den[n] + g32
    merged = ours.merge()
    for n in layers:
        authors = authors_num[n] @ torch.pinverse(authors_den[n])
        mine = merged[n].to(torch.float64)
        worst_w = max(worst_w, relative(authors.to(torch.float64), mine))
        # ‖X E^T‖² = tr(E G_x E^T) with G_x the raw Gram of all tasks' inputs
        gx = sum(g[n] for g in grams)
        diff = authors.to(torch.float64) - mine
        num = torch.einsum("ij,jk,ik->", diff, gx, diff).clamp_min(0).sqrt()
        den = torch.einsum("ij,jk,ik->", mine, gx, mine).sqrt()
        worst_out = max(worst_out, float(num / den))
    print(f"| {alpha} | {worst_w:.1e} | {worst_out:.1e} |")

print("\nhead RegMean, 10 clients (each a tenth of task 0's digits), α_head = 0.5")
head_gram = task_grams(0)["head"]
indices = np.sort(np.concatenate(data.splits[0].train))
features = model.head.in_features
ours = RegMeanMerger()
num, den = 0, 0
for part in np.array_split(indices, 10):
    with torch.no_grad(), GramCollector(model.vit, pattern=r"^head$", dtype=torch.float64) as collector:
        for x, _ in batches(data.dataset.train, part, 256, train=False):
            model.vit(x)
    g = shrink_gram(collector.shrunk(1.0)["head"], 0.5)
    w = torch.randn(data.dataset.num_classes, features, generator=generator, dtype=torch.float64)
    ours.add_client({"head": w}, {"head": g})
    num, den = num + w @ g, den + g
authors = num @ torch.inverse(den)
print(f"relative difference of W (torch.inverse vs lorm_ext's pseudo-inverse, both float64): "
      f"{relative(authors, ours.merge()['head'].to(torch.float64)):.1e}")  # fmt: skip
singular = head_gram.clone()
singular[:, 0] = singular[0, :] = 0  # a feature that no sample activates
try:
    inverse = torch.inverse(singular)
    print(f"singular head Gram: torch.inverse returned entries up to {inverse.abs().max():.1e}")
except torch.linalg.LinAlgError as error:
    print(f"singular head Gram: torch.inverse raises {type(error).__name__}: {str(error).splitlines()[0]}")
