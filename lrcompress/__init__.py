"""lrcompress: compress pretrained image models by low-rank factorization.

The public API is re-exported here; everything else is machinery.
"""

from lrcompress._version import __version__
from lrcompress.errors import CheckpointError, GateFailure, LrcError, TargetError, UserError
from lrcompress.model.arch import LoadedModel, ModelInfo, load_model
from lrcompress.model.layers import LayerSpec, find_layers
from lrcompress.model.plan import LayerPlan, Plan, Target
from lrcompress.model.surgery import decompose_
from lrcompress.model.weights import load, save_compressed

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
