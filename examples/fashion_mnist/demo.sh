#!/usr/bin/env bash
# The README's main command (`make demo`): train a small reference resnet18 on Fashion-MNIST
# (short CPU recipe, once; reused afterwards), look at it, then compress it to 30 % of its MACs
# with a TT decomposition and RENE-style rank search. Runs offline on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
DATA=fashionmnist:${FMNIST:-/usr/share/datasets/fashion-mnist}
OUT=out
CKPT=$OUT/resnet18_fmnist.pt
mkdir -p "$OUT"
if [ ! -f "$CKPT" ]; then
  echo "== training the reference resnet18 (CPU recipe, a few minutes) =="
  python train_reference.py --recipe cpu --data "$DATA" -o "$CKPT"
fi
echo "== inspect =="
lrcompress inspect "$CKPT" --arch timm:resnet18 --input-size 1,28,28
echo "== search: tt, 30 % of the MACs =="
lrcompress search "$CKPT" --arch timm:resnet18 --input-size 1,28,28 --decomp tt \
  --target-flops 0.3 --data "$DATA" -o "$OUT/run-tt-0.3" --overwrite \
  --search-iters 40 --search-warmup 10
echo "Done: $OUT/run-tt-0.3 holds model.safetensors, plan.json and report.json."
