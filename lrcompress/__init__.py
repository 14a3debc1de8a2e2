"""lrcompress: compress pretrained image models by low-rank factorization.

The public API is re-exported here; everything else is machinery.

    result = lrcompress.compress(model, example_inputs, target_flops=0.3, calib=loader)
    lrcompress.save(result, "m.safetensors")
    model = lrcompress.load("m.safetensors", model=MyNet)

Names are imported on first use (PEP 562), so ``lrcompress --help`` and bad-usage errors answer
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lrcompress._version import __version__
from lrcompress.errors import CheckpointError, GateFailure, LrcError, TargetError, UserError

# public name -> the module that defines it
_LAZY = {
    "compress": "lrcompress.api", "distill": "lrcompress.api", "evaluate": "lrcompress.api",
    "export_onnx": "lrcompress.api", "load": "lrcompress.api",
    "recalibrate_bn": "lrcompress.api", "save": "lrcompress.api",
    "select_ranks": "lrcompress.api",
    "CompressConfig": "lrcompress.commands.compress",
    "CompressResult": "lrcompress.commands.compress",
    "LatencyConfig": "lrcompress.measure.latency_target",
    "Accuracy": "lrcompress.measure.metrics",
    "LoadedModel": "lrcompress.model.arch", "ModelInfo": "lrcompress.model.arch",
    "LayerSpec": "lrcompress.model.layers", "find_layers": "lrcompress.model.layers",
    "load_model": "lrcompress.model.loading",
    "LayerPlan": "lrcompress.model.plan", "Plan": "lrcompress.model.plan",
    "Target": "lrcompress.model.plan",
    "decompose_": "lrcompress.model.surgery",
    "save_compressed": "lrcompress.model.weights",
    "ReneConfig": "lrcompress.rank.rene",
    "FinetuneConfig": "lrcompress.recover.finetune",
    "SynthConfig": "lrcompress.calib.synthesize",
    "config_from_dict": "lrcompress.util.config", "config_to_dict": "lrcompress.util.config",
}

__all__ = [
    "__version__",
    "CheckpointError",
    "GateFailure",
    "LrcError",
    "TargetError",
    "UserError",
    "Accuracy",
    "CompressConfig",
    "CompressResult",
    "FinetuneConfig",
    "LatencyConfig",
    "LayerPlan",
    "LayerSpec",
    "LoadedModel",
    "ModelInfo",
    "Plan",
    "ReneConfig",
    "SynthConfig",
    "Target",
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


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lrcompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
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
    from lrcompress.calib.synthesize import SynthConfig
    from lrcompress.commands.compress import CompressConfig, CompressResult
    from lrcompress.measure.latency_target import LatencyConfig
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
