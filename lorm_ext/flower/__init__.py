"""LoRM and the FCIL protocol on Flower (flwr 1.41, Message API; docs/flower.md).

``LoRMStrategy`` (strategy): the LoRM server as a ``flwr.serverapp.strategy.Strategy``; ``client_app.app``: the
ClientApp of the FCIL client; ``serve`` (the body of a ServerApp's main) and ``simulate`` (the protocol in
Flower's simulation engine) in server_app; messages: the Flower records of ``lorm_ext.fcil``'s client seam.
"""

from .server_app import serve, simulate
from .strategy import LoRMStrategy, NoUsableReplyError

__all__ = ["LoRMStrategy", "NoUsableReplyError", "serve", "simulate"]
