"""End-to-end merge demo on generated data: `python -m lorm_ext.demo`.

Clients see differently distributed images (their own colour cast and contrast), so their layer inputs —
and Grams — differ. Each holds a LoRA adapter on every qkv/proj/fc1/fc2 layer of a small timm ViT: a common
part plus its own drift, as after local training. The Grams are collected with the fused op through forward
hooks, the adapters are merged per layer by plain averaging (FedIT: mean of A and mean of B) and by LoRM
(alternating steps and the closed-form rank-r optimum), and the data-weighted objective
Σ_k ‖X_k (ΔW − ΔW_k)ᵀ‖² of each is printed per layer with the time taken.
"""

from __future__ import annotations

import argparse
import logging
import time

import timm
import torch

from .gram import VIT_LORA_PATTERN, GramCollector
from .merge import AdapterMerger
from .progress import Progress, configure_cli_logging

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--num_clients", type=int, default=10)
    p.add_argument("--r", type=int, default=8, help="LoRA rank of every client and of the merged adapter")
    p.add_argument("--images_per_client", type=int, default=64)
    p.add_argument("--depth", type=int, default=4, help="ViT blocks (4 LoRA layers each)")
    p.add_argument("--embed_dim", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("num_clients", "r", "images_per_client", "depth", "embed_dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.r > args.embed_dim:
        p.error(f"--r {args.r} exceeds the narrowest layer width --embed_dim {args.embed_dim}")
    return args


def client_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """Images with a client-specific colour cast and contrast: a covariate shift between clients."""
    cast = torch.randn(1, 3, 1, 1, generator=generator)
    contrast = 0.5 + 1.5 * torch.rand(1, generator=generator)
    return cast + contrast * torch.randn(n, 3, 32, 32, generator=generator)


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_cli_logging()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=3,
        num_classes=10,
    ).eval()
    layers = {name: m.weight.shape for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    common = {
        n: (torch.randn(out, args.r, generator=generator), torch.randn(args.r, width, generator=generator))
        for n, (out, width) in layers.items()
    }

    merger = AdapterMerger(args.r)
    adapters = []
    gram_seconds = 0.0
    progress = Progress(args.num_clients, "clients: Grams + adapters", "client", logger)
    for _ in range(args.num_clients):
        collector = GramCollector(model, VIT_LORA_PATTERN)
        images = client_images(args.images_per_client, generator)
        start = time.perf_counter()
        with torch.no_grad(), collector:
            for batch in images.split(16):
                model(batch)
        gram_seconds += time.perf_counter() - start
        adapter = {
            n: (
                b + 0.5 * torch.randn(b.shape, generator=generator),
                a + 0.5 * torch.randn(a.shape, generator=generator),
            )
            for n, (b, a) in common.items()
            if n in collector.grams
        }
        adapters.append(adapter)
        merger.add_client(
            {n: b for n, (b, _) in adapter.items()}, {n: a for n, (_, a) in adapter.items()}, collector.grams
        )
        progress.update()
    progress.close()

    averaged = {
        n: (torch.stack([c[n][0] for c in adapters]).mean(0), torch.stack([c[n][1] for c in adapters]).mean(0))
        for n in adapters[0]
    }
    timings, objectives = {}, {"FedIT average": merger.objective(averaged)}
    for method in AdapterMerger.METHODS:
        start = time.perf_counter()
        merged = merger.merge(method)
        timings[method] = time.perf_counter() - start
        objectives[f"LoRM {method}"] = merger.objective(merged)

    print(
        f"\n{args.num_clients} clients, rank {args.r}, {len(averaged)} layers; "
        "objective Σ_k ‖X_k (ΔW − ΔW_k)ᵀ‖² per layer (lower is better)\n"
    )
    header = f"{'layer':<22}" + "".join(f"{k:>20}" for k in objectives) + f"{'LoRM / average':>16}"
    print(header + "\n" + "-" * len(header))
    for name in averaged:
        values = [objectives[k][name] for k in objectives]
        print(f"{name:<22}" + "".join(f"{v:>20.4g}" for v in values) + f"{values[-1] / values[0]:>16.3f}")
    print(
        f"\nGram collection (fused op, {args.num_clients} clients): {gram_seconds:.2f} s; "
        + "; ".join(f"merge {m}: {s:.3f} s" for m, s in timings.items())
    )


if __name__ == "__main__":
    main()
