"""Gram collection with forward hooks: G += XᵀX of the inputs of chosen linear layers, through the fused op."""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import ops

# The layers LoRM adapts with LoRA in a timm ViT; with its classification head, the layers whose Grams it uses.
VIT_LORA_PATTERN = r"(^|\.)blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$"
DEFAULT_LAYER_PATTERN = VIT_LORA_PATTERN + r"|(^|\.)head$"


def shrink_gram(gram: Tensor, alpha: float) -> Tensor:
    """α G + (1 − α) diag(G) (reference.shrink_gram_ref). A diagonal (1-D) Gram is returned as is."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"shrinkage alpha must be in [0, 1], got {alpha}")
    if gram.dim() == 1 or alpha == 1.0:
        return gram
    out = gram * alpha
    out.diagonal().add_(gram.diagonal(), alpha=1.0 - alpha)
    return out


def linear_layers(model: nn.Module, pattern: str = DEFAULT_LAYER_PATTERN) -> dict[str, nn.Module]:
    """Modules whose qualified name matches ``pattern`` (re.search) and that have ``in_features``:
    nn.Linear, or a wrapper around one such as a LoRA layer."""
    regex = re.compile(pattern)
    return {
        name: module
        for name, module in model.named_modules()
        if regex.search(name) and isinstance(getattr(module, "in_features", None), int)
    }


class GramCollector:
    """Accumulates the Gram of each chosen layer's input while the model runs inside ``with collector:``.

    Layer inputs (..., in) are flattened to (tokens, in) and added with ``ops.gram_accumulate_`` into
    ``grams[name]``, created on the input's device in ``dtype`` (float32 as the authors; float64 on request).
    ``diagonal`` (a bool, or a predicate on the layer name) keeps only the diagonal: the fast path when the
    shrinkage α is 0. Hooks exist only inside the ``with`` block.

    ``share_inputs``: layers fed the same input tensor object (q/k/v of an attention block, gate/up of a
    gated MLP) get one Gram, computed once per batch: ``grams`` then maps each of them to the same tensor and
    ``shared_input[layer]`` names the first layer (in call order) that read it. Which layers share must be the
    same in every forward pass (else a RuntimeError says which layer changed).

    ``with collector.token_mask(mask): model(...)`` (e.g. a Hugging Face batch's ``attention_mask``) leaves out
    the padded positions: a layer input of shape (*mask.shape, in) contributes only its rows where the mask is
    1, and ``num_tokens`` counts only those; an input with one row per sequence, (mask.shape[0], in) (a head
    on a pooled output), has no padding and is taken whole. A mask of all ones gives exactly the unmasked Gram.
    """

    def __init__(
        self,
        model: nn.Module,
        pattern: str = DEFAULT_LAYER_PATTERN,
        *,
        diagonal: bool | Callable[[str], bool] = False,
        dtype: torch.dtype = torch.float32,
        share_inputs: bool = False,
    ):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Grams accumulate in float32 or float64, got {dtype}")
        self.layers = linear_layers(model, pattern)
        if not self.layers:
            raise ValueError(f"no linear layer of the model matches the pattern {pattern!r}")
        is_diagonal = diagonal if callable(diagonal) else (lambda name: bool(diagonal))
        self.diagonal = {name: is_diagonal(name) for name in self.layers}
        self.dtype = dtype
        self.grams: dict[str, Tensor] = {}
        self.num_tokens: dict[str, int] = {}
        self.share_inputs = share_inputs
        self.shared_input: dict[str, str] = {}  # layer -> first layer that read its input
        # id(input) -> (weak reference, first layer that read it, diagonal?): weak, so that a freed input
        # whose address is reused by another tensor is never taken for it
        self._inputs: dict[int, tuple[weakref.ref, str, bool]] = {}
        self._handles: list = []
        self._mask: _TokenMask | None = None

    @contextmanager
    def token_mask(self, mask: Tensor | None) -> Iterator[None]:
        """Inside the block, only the tokens where ``mask`` (bool, or integers / floats that are 0 or 1; shape
        (batch, seq) or any leading shape of the layer inputs) is 1 enter the Grams; None masks nothing."""
        previous, self._mask = self._mask, None if mask is None else _TokenMask(mask)
        try:
            yield
        finally:
            self._mask = previous

    def _reader(self, name: str, x: Tensor) -> str:
        """The layer whose Gram ``x`` goes into: the first layer that read this very tensor, or ``name``."""
        key, seen = id(x), self._inputs.get(id(x))
        alive = seen is not None and seen[0]() is x
        if alive and seen[2] == self.diagonal[name]:
            first = seen[1]
        else:
            first = name
            if not alive:  # a new tensor, or a dead entry whose address was reused

                def forget(ref, key=key):
                    if self._inputs.get(key, (None,))[0] is ref:
                        del self._inputs[key]

                self._inputs[key] = (weakref.ref(x, forget), name, self.diagonal[name])
        expected = self.shared_input.setdefault(name, first)
        if expected != first:
            now = "its own input" if first == name else f"the input of {first!r}"
            raise RuntimeError(
                f"GramCollector(share_inputs=True): layer {name!r} read the input of {expected!r} in an earlier "
                f"forward pass but {now} in this one; use share_inputs=False for this model"
            )
        return first

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            x = args[0]
            width = x.shape[-1]
            first = self._reader(name, x) if self.share_inputs else name  # the very tensor, before masking
            rows = None if self._mask is None else self._mask.rows(name, x)  # None: every row is a token
            if name not in self.grams:
                if first != name:
                    self.grams[name] = self.grams[first]
                else:
                    shape = (width,) if self.diagonal[name] else (width, width)
                    self.grams[name] = torch.zeros(shape, dtype=self.dtype, device=x.device)
                self.num_tokens[name] = 0
            if first == name:
                tokens = x if rows is None else x.reshape(-1, width).index_select(0, rows)
                ops.gram_accumulate_([self.grams[name]], [tokens])
            self.num_tokens[name] += x.numel() // width if rows is None else rows.numel()

        return hook

    def __enter__(self) -> GramCollector:
        if self._handles:
            raise RuntimeError("GramCollector is already collecting")
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        """Forget the Grams collected so far."""
        self.grams.clear()
        self.num_tokens.clear()
        self.shared_input.clear()

    def shrunk(self, alpha: float | Mapping[str, float] | Callable[[str], float]) -> dict[str, Tensor]:
        """The Grams after shrinkage α G + (1 − α) diag(G), α per layer (a number, a dict or a function)."""
        alpha_of = alpha if callable(alpha) else (alpha.__getitem__ if isinstance(alpha, Mapping) else lambda _: alpha)
        return {name: shrink_gram(gram, alpha_of(name)) for name, gram in self.grams.items()}


class _TokenMask:
    """A checked token mask and, per device, the flat indices of its kept tokens (computed once per mask)."""

    def __init__(self, mask: Tensor):
        if not isinstance(mask, Tensor):
            raise ValueError(f"token mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() == 0 or mask.is_complex():
            raise ValueError(
                f"token mask must be a real tensor of shape (batch, seq), got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        keep = mask != 0
        if mask.dtype != torch.bool and not bool((keep == (mask == 1)).all()):
            raise ValueError(
                "token mask must hold only 0 and 1 (1 = a real token, 0 = padding): got other values "
                "(an additive or 4-D attention mask?)"
            )
        self.shape = tuple(mask.shape)
        self.all_kept = bool(keep.all())
        self._keep = keep.reshape(-1)
        self._rows: dict[torch.device, Tensor] = {}

    def rows(self, layer: str, x: Tensor) -> Tensor | None:
        """The flat indices of the rows of the layer input ``x`` (..., in) that are real tokens, on its device;
        None when every row is one: all tokens kept, or ``x`` has one row per sequence."""
        leading = tuple(x.shape[:-1])
        if leading == self.shape[:1]:
            return None
        if leading != self.shape:
            raise RuntimeError(
                f"GramCollector: layer {layer!r} reads an input of shape {tuple(x.shape)}, which matches neither the "
                f"token mask's shape {self.shape} (tokens) nor {self.shape[:1]} (one row per sequence)"
            )
        if self.all_kept:
            return None
        rows = self._rows.get(x.device)
        if rows is None:
            rows = self._rows[x.device] = self._keep.to(x.device).nonzero().squeeze(1)
        return rows
