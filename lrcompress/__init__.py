"""lrcompress: compress pretrained image models by low-rank factorization.

The public API is re-exported here; everything else is machinery.
"""

from ._version import __version__
from .errors import CheckpointError, GateFailure, LrcError, TargetError, UserError
from .export import load, save_compressed
from .models import LoadedModel, ModelInfo, load_model
from .plan import LayerPlan, Plan, Target
from .surgery import decompose_
from .targets import LayerSpec, find_layers

__all__ = [
    "__version__",
    "CheckpointError",
    "GateFailure",
    "LayerSpec",
    "LoadedModel",
    "LrcError",
    "ModelInfo",
    "TargetError",
    "UserError",
    "LayerPlan",
    "Plan",
    "Target",
    "decompose_",
    "find_layers",
    "load",
    "load_model",
    "save_compressed",
]
