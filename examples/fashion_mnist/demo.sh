#!/usr/bin/env bash
# The README's main command (`make demo`): the whole job on real data, offline, on 2 CPU cores.
#   1. train a reference resnet18 on Fashion-MNIST (short CPU recipe; once, then reused),
#   2. look at it (inspect),
#   3. compress it to 30 % of its MACs: TT factorization, RENE rank search, 400 steps of
#      distillation fine-tuning (search),
#   4. export ONNX checked in ONNX Runtime, with measured latency (export),
#   5. gate it as a CI pipeline would: at most 1 point of top-1 lost, at least 60 % fewer MACs.
set -euo pipefail
cd "$(dirname "$0")"
DATA=fashionmnist:${FMNIST:-/usr/share/datasets/fashion-mnist}
OUT=out
CKPT=$OUT/resnet18_fmnist.pt
RUN=$OUT/run-tt-0.3
mkdir -p "$OUT"
if [ ! -f "$CKPT" ]; then
  echo "== 1. training the reference resnet18 (CPU recipe, about 4 minutes) =="
  python train_reference.py --recipe cpu --data "$DATA" -o "$CKPT"
fi
echo "== 2. inspect =="
lrcompress inspect "$CKPT" --arch timm:resnet18 --input-size 1,28,28
echo "== 3. search: tt, 30 % of the MACs, rene ranks, distillation fine-tuning =="
lrcompress search "$CKPT" --arch timm:resnet18 --input-size 1,28,28 --decomp tt \
  --target-flops 0.3 --data "$DATA" -o "$RUN" --overwrite --max-steps 400
echo "== 4. export: ONNX, checked in ONNX Runtime, latency before/after =="
lrcompress export "$RUN" --format onnx,safetensors
echo "== 5. gate =="
lrcompress gate "$RUN" --max-top1-drop 1.0 --min-flops-reduction 0.6 --junit "$OUT/gate.xml"
echo "Done: $RUN holds model.safetensors, model.onnx, plan.json, report.json, report.md, report.html."
