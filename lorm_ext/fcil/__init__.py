"""A thin driver for Federated Class-Incremental Learning with LoRM and LoRA baselines (docs/fcil.md).

Modules: ``config`` (every flag, checked before work), ``data`` (embedded MNIST, CIFAR-100 archive, image
folders; the authors' Dirichlet split), ``model`` (timm ViT + LoRA, offline weights), ``protocol`` (units,
participants, the ``Instruction``, message keys and layout, ΔW, ``open_unit`` / ``close_unit``), ``client`` (the
client step), ``strategies`` (the server of lorm, fedit, ffa-lora, lora-fair, centralized), ``driver`` (the
loop, evaluation, checkpoints), ``metrics``, ``plots``, ``cli`` (``lorm-fcil``).

The seam for a federated runtime such as Flower (``protocol`` states it): a ClientApp calls
``client.client_step(model, images, indices, instruction, config, client_id)`` and sends back
``reply.message`` (a dict of tensors); a ServerApp holds a ``strategies.Server`` and, per unit of
``protocol.units``, calls ``protocol.open_unit`` (the instruction to broadcast: scalars plus a dict of tensors),
``receive`` for each reply in increasing client id, and ``protocol.close_unit``. Both sides rebuild the same
``RunConfig``; every random draw comes from a seed derived from (seed, task, round, client), so the in-process
run is reproduced bit for bit.
"""

import importlib

# Imported on first use (PEP 562), so that `lorm-fcil --help` and the configuration need neither the [fcil]
# extra (timm, torchvision) nor its import time.
_EXPORTS = {
    "ClientReply": "client",
    "Instruction": "protocol",
    "client_step": "client",
    "ConfigError": "config",
    "RunConfig": "config",
    "RunData": "driver",
    "prepare": "driver",
    "run": "driver",
    "SERVERS": "strategies",
    "Server": "strategies",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
