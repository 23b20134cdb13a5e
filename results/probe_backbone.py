"""How useful is the embedded backbone for the embedded MNIST split, and how much room does adaptation have?

Joint (not incremental) training on all 10 classes of the 4000 training digits, tested on the 10 000 test
digits: the pretrained digits-vit's own digits head (zero-shot), a linear probe (head only, 3 epochs) and
full fine-tuning (3 epochs), against the same architecture with random weights. Run from the repository
root: python results/probe_backbone.py
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lorm_ext.fcil.config import RunConfig
from lorm_ext.fcil.data import batches, load_dataset
from lorm_ext.fcil.driver import check
from lorm_ext.fcil.model import HEAD, build_model, resolve_weights


@torch.no_grad()
def accuracy(vit, test) -> float:
    vit.eval()
    hits = [(vit(x).argmax(1) == y).float() for x, y in batches(test, np.arange(len(test)), 256, train=False)]
    return 100 * float(torch.cat(hits).mean())


def trained(vit, train, parameters, lr: float) -> torch.nn.Module:
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    vit.train()
    for _ in range(3):
        for x, y in batches(train, np.arange(len(train)), 16, train=True, generator=generator):
            loss = F.cross_entropy(vit(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return vit


def main() -> None:
    torch.set_num_threads(1)
    config = RunConfig()
    data = load_dataset(config, check(config))
    weights = resolve_weights(config)
    for name, path in (("pretrained on sklearn digits", weights), ("random weights", None)):
        row = {}
        if path is not None:
            model = build_model(config, 10, path)
            saved = load_file(path)
            model.load({f"head/{k}": saved[f"{HEAD}.{k}"] for k in ("weight", "bias")})
            row["zero-shot"] = accuracy(model.vit, data.test)
        model = build_model(config, 10, path)
        row["linear probe"] = accuracy(trained(model.vit, data.train, list(model.head.parameters()), 3e-3), data.test)
        model = build_model(config, 10, path)
        base = [p for n, p in model.vit.named_parameters() if "lora_" not in n]  # W0 itself; adapters stay B = 0
        row["full fine-tuning"] = accuracy(trained(model.vit, data.train, base, 1e-3), data.test)
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} %" for k, v in row.items()))


if __name__ == "__main__":
    main()
