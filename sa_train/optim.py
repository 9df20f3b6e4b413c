"""CausalLM's optimizers: AdamW (``model.optimizer: adamw``, the default), or torch's Muon for the hidden
matrices and AdamW for the rest (``muon``), as one optimizer; their settings' checks.

Lightning's automatic optimisation, its gradient clipping hook, the GradScaler of ``16-mixed``, the
LR scheduler and checkpoints all take one ``torch.optim.Optimizer``; torch ships Muon and AdamW but
nothing that runs two optimizers as one, so :class:`MuonWithAdamW` composes them. It is the same
composition DeepSpeed's own ``MuonWithAuxAdam`` uses: the inner optimizers share the outer one's
param-group dicts and its state dict, so the schedule, clipping and ``state_dict`` see one optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy
from torch import nn

from sa_train.errors import ConfigError

OPTIMIZERS = ("adamw", "muon")

# Muon's update is orthogonalised and then scaled by 0.2·sqrt(max(rows, cols)), which gives every matrix an
# update RMS of 0.2·lr whatever its shape: about AdamW's (Moonshot, "Muon is Scalable for LLM Training").
MUON_ADJUST_LR = "match_rms_adamw"
MUON_MOMENTUM = 0.95  # with Nesterov momentum, Muon's usual setting (torch's defaults)


def uses_muon(name: str, param: nn.Parameter) -> bool:
    """The split, stated once: Muon takes the 2-D weights of the decoder layers (the q/k/v/o projections
    and the MLP's gate/up/down); AdamW takes the embedding, the LM head (tied or not) and the norms.

    Muon orthogonalises a matrix's update, which suits the linear maps inside the network; the embedding
    and the head are indexed by token (a rare token's row would get as large an update as a common one's)
    and norms are vectors, so they stay on AdamW, as in Muon's reference recipes. ``name`` is the
    parameter's name in :class:`~sa_train.model.SAModel`.
    """
    return param.ndim == 2 and name.startswith("layers.")


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    fused: bool = True,
) -> torch.optim.AdamW:
    """AdamW with decay on matrices only; the fused kernel (CPU and CUDA) is ~15x faster on CPU than the
    per-parameter loop. ``fused=False`` uses the multi-tensor (foreach) kernel instead."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=None if fused else True
    )


def fused_optimizer_fits(precision: str) -> bool:
    """Whether the fused AdamW can run under a Trainer ``precision`` with gradient clipping.

    Only ``16-mixed`` scales the loss (a GradScaler): gradients must be unscaled before they are clipped,
    and a fused optimizer unscales inside its own step, too late, so that precision gets the foreach kernel.
    ``bf16-mixed`` and ``32-true`` never scale, so the fused kernel and clipping work together there (and
    :meth:`CausalLM.configure_gradient_clipping` clips itself, as Lightning refuses every fused optimizer).
    """
    return precision not in ("16-mixed", "16")


def check_optimizer_settings(
    lr: float,
    min_lr_ratio: float,
    warmup_steps: int,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    optimizer: str,
    muon_lr: float | None,
) -> None:
    """Every optimizer and schedule setting out of range, in one message naming each field."""
    problems = []
    if not lr > 0:
        problems.append(f"model.lr={lr} must be positive (3e-4 is a common start)")
    if optimizer not in OPTIMIZERS:
        problems.append(f"model.optimizer={optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
    if muon_lr is not None and not muon_lr > 0:
        problems.append(
            f"model.muon_lr={muon_lr} must be positive (the learning rate of model.optimizer=muon; null "
            "takes model.lr)"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        problems.append(f"model.min_lr_ratio={min_lr_ratio} must lie in [0, 1]")
    if warmup_steps < 0:
        problems.append(f"model.warmup_steps={warmup_steps} must be >= 0")
    if weight_decay < 0:
        problems.append(f"model.weight_decay={weight_decay} must be >= 0 (0 switches decay off)")
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        problems.append(f"model.betas={list(betas)} must be two values in [0, 1), e.g. [0.9, 0.95]")
    if not eps > 0:
        problems.append(f"model.eps={eps} must be positive (1e-8 is usual)")
    if problems:
        raise ConfigError("; ".join(problems) + ".")


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` and ``torch.optim.Muon`` stepped as one optimizer.

    ``param_groups`` lists the AdamW groups first (so ``param_groups[0]["lr"]``, logged as ``train/lr``,
    is AdamW's in both optimizer choices), then the Muon groups; each is the very dict its inner optimizer
    steps with, so the LR schedule's writes reach both. ``state`` is one mapping shared by both inner
    optimizers, so ``state_dict``/``load_state_dict`` are torch's own and a resume restores both bitwise.
    The inner optimizers unscale nothing themselves, so a GradScaler unscales before clipping, as with
    the foreach AdamW.
    """

    def __init__(
        self,
        adamw_groups: list[dict[str, Any]],
        muon_groups: list[dict[str, Any]],
        adamw: dict[str, Any],
        muon: dict[str, Any],
    ) -> None:
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        self.muon = torch.optim.Muon(muon_groups, **muon)
        super().__init__([*self.adamw.param_groups, *self.muon.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this one's groups and state (after init and after a load, which
        replaces both)."""
        split = len(self.adamw.param_groups)
        self.adamw.param_groups, self.muon.param_groups = self.param_groups[:split], self.param_groups[split:]
        self.adamw.state = self.muon.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss


def build_muon_optimizer(
    model: nn.Module,
    lr: float,
    muon_lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    fused: bool = True,
) -> MuonWithAdamW:
    """Muon (``muon_lr``, ``weight_decay``) for the hidden matrices of :func:`uses_muon`; AdamW (``lr``,
    decay on the embedding and head matrices only, as :func:`build_optimizer`) for the
    rest. Both apply decoupled weight decay as lr·decay per step.

    Muon's learning rate is adjusted by torch's ``match_rms_adamw`` rather than its ``original`` (Keller
    Jordan's sqrt(max(1, rows/cols))): with ``original`` a matrix's update RMS falls as 1/sqrt(width), so a
    ``muon_lr`` tuned at d_model 256 would step a quarter as far at 4096, and its lr·decay would need
    retuning with it; matched to AdamW's RMS, ``muon_lr`` and ``weight_decay`` mean what they mean for
    AdamW at every width. That is also why ``muon_lr`` defaults to AdamW's ``lr`` (Moonshot reused AdamW's
    tuned rate): 80 steps of a 4-layer, d_model 128 model on the shipped corpus at ``lr`` 3e-3 reached a
    validation loss of 4.59 with AdamW alone and, with Muon at 1e-3 / 3e-3 / 1e-2 / 2e-2, 3.97 / 3.95 / 3.99
    / 4.08 (one seed each).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if uses_muon(name, p)]
    rest = [p for name, p in named if not uses_muon(name, p)]
    adamw_groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    adamw = {"lr": lr, "betas": betas, "eps": eps, "fused": fused, "foreach": None if fused else True}
    muon = {
        "lr": muon_lr,
        "weight_decay": weight_decay,
        "momentum": MUON_MOMENTUM,
        "nesterov": True,
        "adjust_lr_fn": MUON_ADJUST_LR,
    }
    return MuonWithAdamW(adamw_groups, [{"params": hidden}], adamw, muon)


def check_optimizer_fits_strategy(optimizer: str, strategy: Strategy) -> None:
    """DeepSpeed's ZeRO hands a client optimizer flat 1-D shards of the weights, and torch's Muon
    orthogonalises whole matrices (it raises on anything but 2-D). DeepSpeed's own Muon gathers the
    matrices inside ZeRO, but only as the optimizer of its config, which sa_train's schedule, clipping and
    checkpoints do not drive."""
    if optimizer == "muon" and isinstance(strategy, DeepSpeedStrategy):
        raise ConfigError(
            "model.optimizer=muon cannot run under trainer.strategy DeepSpeed: ZeRO hands the optimizer flat "
            "1-D shards of the weights, and Muon orthogonalises each weight matrix whole (DeepSpeed's own "
            "Muon works only as the optimizer of its config, outside sa_train's schedule and checkpoints). "
            "Train with trainer.strategy=ddp (Muon keeps one buffer per matrix where AdamW keeps two, which "
            "spares part of what ZeRO's sharding would), or keep DeepSpeed with model.optimizer=adamw."
        )
