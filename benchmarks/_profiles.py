"""What the benchmark runs: the models, the grid, and the two budget profiles.

``quick`` fits the 2-core CPU machines (well under an hour for the whole grid); ``full`` is the
GPU profile (about 10 minutes per model on one H100). Every figure in RESULTS.md says which
profile, and so which budget, produced it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from lrcompress.util.resources import cpu_has_bf16

FMNIST = "fashionmnist:/usr/share/datasets/fashion-mnist"
TP = "torch-pruning"
LR_METHODS = ("rene", "uniform", "vbmf")  # lrcompress rank-selection methods compared
METHODS = (*LR_METHODS, TP)
DECOMPS = ("tt", "tucker2", "cp")
TARGETS = (0.5, 0.3)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # short name used in row ids and tables
    arch: str  # lrcompress --arch
    checkpoint: str  # file name under the checkpoint folder
    input_size: tuple[int, int, int] = (1, 28, 28)
    train_args: tuple[str, ...] = ()  # extra train_reference.py arguments

    @property
    def input_size_arg(self) -> str:
        return ",".join(map(str, self.input_size))


MODELS = {
    "resnet18": ModelSpec("resnet18", "timm:resnet18", "resnet18_fmnist.pt"),
    "mobilenetv2": ModelSpec("mobilenetv2", "timm:mobilenetv2_100", "mobilenetv2_fmnist.pt"),
    # ViT-Tiny on 4x4 patches: 49 tokens + the class token at 28x28 (train_reference.py's
    # vit_tiny_patch4_28). About 3x resnet18's training time per step on one CPU thread, so its
    # reference gets one epoch of the CPU recipe (AdamW, the recipe's choice for ViTs).
    "vit_tiny": ModelSpec("vit_tiny", "timm:vit_tiny_patch16_224(img_size=28,patch_size=4)",
                          "vit_tiny_fmnist.pt", train_args=("--epochs", "1")),
    # ConvNeXt downsamples by 32, and 28x28 reaches 1x1 before its last stage; output_stride=16
    # dilates the last stage instead (feature maps 7, 3, 1, 1). Trained with AdamW, as ConvNeXt
    # is (SGD at lr 0.1 is the recipe's choice for the CNNs above).
    "convnext_atto": ModelSpec("convnext_atto", "timm:convnext_atto(output_stride=16)",
                               "convnext_atto_fmnist.pt", train_args=("--opt", "adamw")),
}


@dataclass(frozen=True)
class Profile:
    name: str
    device: str  # --device of every run: cpu | cuda | auto
    threads: int  # OMP/torch threads of the runs (0: leave the default)
    reference_recipe: str  # train_reference.py --recipe for missing checkpoints
    max_steps: int | None  # fine-tuning step budget (lrcompress --max-steps), or
    finetune_epochs: int  # ... epochs (used when max_steps is None)
    test_subset: int | None  # evaluate on the first N test images (None: all 10k)
    batch_size: int = 128
    search_iters: int | None = None  # rene --search-iters (None: lrcompress's default)
    search_warmup: int | None = None  # rene --search-warmup
    seed: int = 0
    precision: str = "auto"  # fine-tuning --precision (auto: bf16 on CUDA, fp32 on CPU)
    tp_scope: str = "global"  # Torch-Pruning ranking scope (tp_baseline.py --scope)
    tp_round_to: int = 8  # channels rounded like lrcompress's --rank-multiple 8
    lat_threads: tuple[int, ...] = (1, 2)  # ONNX Runtime CPU intra-op threads (0: all)
    lat_batches: tuple[int, ...] = (1, 64)
    lat_repeats: int = 20
    lat_warmup: int = 5
    lat_torch: bool = False  # also PyTorch eager (CPU, and CUDA when present)
    decompose_bench: bool = True  # time one 512×512×3×3 layer per factorization
    notes: tuple[str, ...] = field(default=())

    def budget(self) -> dict:
        """The settings a result depends on (a row is re-run when they change)."""
        d = asdict(self)
        for k in ("name", "notes", "decompose_bench"):
            d.pop(k)
        return d

    def finetune_args(self) -> list[str]:
        prec = [] if self.precision == "auto" else ["--precision", self.precision]
        if self.max_steps is not None:
            return ["--max-steps", str(self.max_steps), *prec]
        return ["--finetune-epochs", str(self.finetune_epochs), *prec]

    def eval_args(self) -> list[str]:
        return [] if self.test_subset is None else ["--test-subset", str(self.test_subset)]

    def rene_args(self) -> list[str]:
        out = []
        if self.search_iters is not None:
            out += ["--search-iters", str(self.search_iters)]
        if self.search_warmup is not None:
            out += ["--search-warmup", str(self.search_warmup)]
        return out

    def with_overrides(self, **kw) -> Profile:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


PROFILES = {
    "quick": Profile(
        name="quick", device="cpu", threads=1, reference_recipe="cpu", max_steps=100,
        finetune_epochs=0, test_subset=2000, search_iters=30, search_warmup=10,
        # 1.5x faster fine-tuning where the CPU has bf16 instructions (measured on the 2-core
        # AMD EPYC boxes); every row of a run uses the same precision.
        precision="bf16" if cpu_has_bf16() else "fp32",
        notes=("CPU profile for the shared 2-core machines: every run on one thread.",),
    ),
    "full": Profile(
        name="full", device="cuda", threads=0, reference_recipe="gpu", max_steps=None,
        finetune_epochs=2, test_subset=None, lat_threads=(1, 0), lat_repeats=50,
        lat_warmup=10, lat_torch=True,
        notes=("GPU profile: fine-tuning 2 epochs, the whole test set, rene at its defaults.",),
    ),
}
