"""Training losses and regularizers: fine-tuning, the rene rank search and LoRITa use these.

* ``kd_loss``: logit distillation, T² · KL(teacher_T ‖ student_T) (Hinton et al.);
* ``diss_loss``: RENE's layer matching (§4.4, Eqs. 10–11, methods.md §2.7),
  Σ_i ‖W_i − Ŵ_i‖² + Σ_i ‖O_i(x) − D_i(x)‖² over the factorized layers i, where Ŵ_i is the dense
  weight the student's chain computes and O_i / D_i are the outputs of layer i in teacher and
  student, kept by ``Taps`` (forward hooks on the same module name);
* ``frobenius_decay`` (Khodak et al. 2021, methods.md §7.2): ½‖Ŵ_i‖²_F on the *product*;
* ``orthogonality``: ELRT's double soft orthogonality (DSO, Bansal et al. 2018)
  ‖UᵀU − I‖² + ‖UUᵀ − I‖², or soft orthogonality (SO) on the smaller Gram, on every 1×1/linear
  factor matrix of the chains;
* ``hoyer`` (SVD training, Yang et al. 2020, methods.md §5.2): Σ_i (‖s_i‖₁/‖s_i‖₂ − 1) on the
  singular values s_i of each reconstructed weight (matricized T × rest), pushing ranks down;
* ``schatten_penalty`` (LoRITa, methods.md §4): the Schatten-(2/N) quasi-norm N·Σ σ^{2/N} that
  weight decay on N balanced factors equals (reported before and after LoRITa's training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lrcompress.factorizations import chain_factors, get_factorization
from lrcompress.model.plan import Plan


def kd_loss(logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0
            ) -> torch.Tensor:
    """T² · KL(teacher_T ‖ student_T), averaged over the batch (Hinton et al.'s logit KD)."""
    tt = temperature
    return F.kl_div(F.log_softmax(logits / tt, 1), F.log_softmax(t_logits / tt, 1),
                    reduction="batchmean", log_target=True) * tt * tt


class Taps:
    """Forward hooks that keep the latest output of named modules."""

    def __init__(self, model: nn.Module, names):
        self.out = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def fn(_m, _i, o):
            self.out[name] = o

        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


def _product(student: nn.Module, lp) -> torch.Tensor:
    """Ŵ: the dense weight that the factorized chain of layer ``lp`` computes."""
    return get_factorization(lp.factorization).reconstruct(
        chain_factors(student.get_submodule(lp.name)), lp.spec)


def diss_loss(student, plan, teacher_w, s_taps, t_taps, reduction) -> torch.Tensor:
    """Σ_i red(Ŵ_i, W_i) + red(D_i(x), O_i(x)); red is the mean or the sum of squares."""
    red = F.mse_loss if reduction == "mean" else (lambda a, b: (a - b).pow(2).sum())
    total = 0.0
    for lp in plan.layers:
        w = _product(student, lp)
        total = total + red(w, teacher_w[lp.name])
        total = total + red(s_taps.out[lp.name].float(), t_taps.out[lp.name].float())
    return total


def frobenius_decay(student: nn.Module, plan: Plan) -> torch.Tensor:
    """Σ_i ½‖Ŵ_i‖²_F over factorized layers (the product, not the factors)."""
    total = 0.0
    for lp in plan.layers:
        w = _product(student, lp)
        total = total + 0.5 * w.pow(2).sum()
    return total


def _factor_matrices(student: nn.Module, plan: Plan):
    """The 2-D factor matrices of the chains: weights of their 1×1 convs and linear layers."""
    for lp in plan.layers:
        for m in student.get_submodule(lp.name).modules():
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                                            and m.groups == 1):
                yield m.weight.reshape(m.weight.shape[0], -1)


def orthogonality(student: nn.Module, plan: Plan, kind: str) -> torch.Tensor:
    """DSO: ‖UᵀU − I‖² + ‖UUᵀ − I‖²; SO: the Gram of the smaller side only."""
    total = 0.0
    for u in _factor_matrices(student, plan):
        g_small = u @ u.T if u.shape[0] <= u.shape[1] else u.T @ u
        eye = torch.eye(g_small.shape[0], device=u.device, dtype=u.dtype)
        total = total + (g_small - eye).pow(2).sum()
        if kind == "dso":
            g_big = u.T @ u if u.shape[0] <= u.shape[1] else u @ u.T
            eye = torch.eye(g_big.shape[0], device=u.device, dtype=u.dtype)
            total = total + (g_big - eye).pow(2).sum()
    return total


def hoyer_value(w: torch.Tensor) -> torch.Tensor:
    """‖s‖₁/‖s‖₂ − 1 for the singular values s of ``w`` matricized as (rows, rest)."""
    s = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
    return s.sum() / s.norm() - 1


def hoyer(student: nn.Module, plan: Plan) -> torch.Tensor:
    """Σ_i (‖s_i‖₁/‖s_i‖₂ − 1) over factorized layers: Hoyer sparsity of singular values (§5.2)."""
    total = 0.0
    for lp in plan.layers:
        w = _product(student, lp)
        total = total + hoyer_value(w.float())
    return total


def schatten_penalty(w: torch.Tensor, n: int) -> float:
    """N·Σ σ^{2/N} of w matricized as (rows, rest): the minimum of Σ_j ‖F_j‖²_F over splits into
    n factors, i.e. what LoRITa's weight decay on the factors amounts to (a report value)."""
    s = torch.linalg.svdvals(w.detach().double().reshape(w.shape[0], -1))
    return float(n * s.pow(2.0 / n).sum())
