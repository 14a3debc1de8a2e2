"""lrcompress: compress pretrained image models by low-rank factorization.

The public API is re-exported here; everything else is machinery.

    result = lrcompress.compress(model, example_inputs, target_flops=0.3, calib=loader)
    lrcompress.save(result, "m.safetensors")
    model = lrcompress.load("m.safetensors", model=MyNet)
"""

from lrcompress._version import __version__
from lrcompress.api import (
    compress,
    distill,
    evaluate,
    export_onnx,
    load,
    recalibrate_bn,
    save,
    select_ranks,
)
from lrcompress.commands.compress import CompressConfig, CompressResult
from lrcompress.errors import CheckpointError, GateFailure, LrcError, TargetError, UserError
from lrcompress.measure.metrics import Accuracy
from lrcompress.model.arch import LoadedModel, ModelInfo
from lrcompress.model.layers import LayerSpec, find_layers
from lrcompress.model.loading import load_model
from lrcompress.model.plan import LayerPlan, Plan, Target
from lrcompress.model.surgery import decompose_
from lrcompress.model.weights import save_compressed
from lrcompress.rank.rene import ReneConfig
from lrcompress.recover.finetune import FinetuneConfig
from lrcompress.util.config import config_from_dict, config_to_dict

__all__ = [
    "__version__",
    "Accuracy",
    "CheckpointError",
    "CompressConfig",
    "CompressResult",
    "FinetuneConfig",
    "GateFailure",
    "LayerPlan",
    "LayerSpec",
    "LoadedModel",
    "LrcError",
    "ModelInfo",
    "Plan",
    "ReneConfig",
    "Target",
    "TargetError",
    "UserError",
    "compress",
    "config_from_dict",
    "config_to_dict",
    "decompose_",
    "distill",
    "evaluate",
    "export_onnx",
    "find_layers",
    "load",
    "load_model",
    "recalibrate_bn",
    "save",
    "save_compressed",
    "select_ranks",
]
