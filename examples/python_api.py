"""Load a compressed model with one call and run it: no pickle, no extra file.

    python examples/python_api.py runs/r18-tt30      # a RUN folder or its model.safetensors
"""

import sys
from pathlib import Path

import torch

import lrcompress

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/r18-tt30")
model = lrcompress.load(run)  # architecture + factorized layers rebuilt from the header's plan
folder = run if run.is_dir() else run.parent
plan = lrcompress.Plan.from_json((folder / "plan.json").read_text())

x = torch.randn(8, *plan.input_size)  # a random batch of the size the model was compressed at
with torch.inference_mode():
    logits = model(x)
print(f"{plan.arch}: input {tuple(x.shape)} -> output {tuple(logits.shape)}; "
      f"{plan.macs_ratio:.2f} of the original MACs")
