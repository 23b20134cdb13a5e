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

from .client import ClientReply, client_step
from .config import ConfigError, RunConfig
from .driver import RunData, prepare, run
from .protocol import Instruction
from .strategies import SERVERS, Server

__all__ = [
    "SERVERS",
    "ClientReply",
    "ConfigError",
    "Instruction",
    "RunConfig",
    "RunData",
    "Server",
    "client_step",
    "prepare",
    "run",
]
