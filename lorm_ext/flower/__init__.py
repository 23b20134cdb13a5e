"""LoRA merging on Flower (flwr 1.41, Message API; docs/flower.md).

For any Flower app with any LoRA model: ``LoRAMergeStrategy`` (strategy), whose nodes reply with
``messages.lora_reply`` (factors and Grams of the modules the strategy names) and load ``messages.read_adapter``.
Built on it, the FCIL protocol of ``lorm_ext.fcil``: ``LoRMStrategy`` (fcil_strategy), ``client_app.app`` (the
ClientApp of the FCIL client), ``serve`` (the body of a ServerApp's main) and ``simulate`` (the protocol in
Flower's simulation engine) in server_app.
"""

from .._install import needs_extra

with needs_extra("flower", "lorm_ext.flower"):
    from .fcil_strategy import LoRMStrategy
    from .messages import lora_reply, read_adapter
    from .server_app import serve, simulate
    from .strategy import LoRAMergeStrategy, NoUsableReplyError

__all__ = ["LoRAMergeStrategy", "LoRMStrategy", "NoUsableReplyError", "lora_reply", "read_adapter", "serve", "simulate"]
