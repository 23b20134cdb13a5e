"""lorm_ext: fused ops for LoRM (closed-form merging of LoRA modules) and a thin FCIL driver."""

from . import ops, reference
from .gram import DEFAULT_LAYER_PATTERN, GramCollector, linear_layers, shrink_gram
from .merge import (
    AdapterMerger,
    AStepMerger,
    BStepMerger,
    RegMeanMerger,
    low_rank_alternating,
    low_rank_exact,
    project_client,
)
from .validation import LayerError

__all__ = [
    "DEFAULT_LAYER_PATTERN",
    "AStepMerger",
    "AdapterMerger",
    "BStepMerger",
    "GramCollector",
    "LayerError",
    "RegMeanMerger",
    "linear_layers",
    "low_rank_alternating",
    "low_rank_exact",
    "ops",
    "project_client",
    "reference",
    "shrink_gram",
]
