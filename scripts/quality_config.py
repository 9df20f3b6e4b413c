"""What the quality study of scripts/quality_study.py is made of: its variants (and which are retrofits,
Muon or switched runs), the model and batch shapes, the scales it runs at, the record of one run and the
split sizes of a prepared corpus, and ``StudyError``, the failure every module of the study raises."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "sa-tiny.yaml"
ISSUE12_VARIANTS = ("dense", "every2", "every4", "paper", "retrofit", "retrofit-unmatched")
VARIANTS = (*ISSUE12_VARIANTS, "dense-muon", "every4-muon", "switch-early", "switch-late")
RETROFITS = ("retrofit", "retrofit-unmatched")  # converted with and without head matching
RETROFIT_GROUPS = "every:4"
MUON = ("dense-muon", "every4-muon")  # model.optimizer: muon; every other variant trains with AdamW
# model.sa_switch: dense for this fraction of the run's steps, then SWITCH_GROUPS for the rest.
SWITCHES = {"switch-early": 0.25, "switch-late": 0.5}
SWITCH_GROUPS = "every:4"


class StudyError(Exception):
    """A bad option or a failed step: the message names it and the fix."""


@dataclass(frozen=True)
class Shape:
    """One model and batch shape of the study; everything else comes from configs/sa-tiny.yaml."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    seq_len: int
    batch_size: int
    lr: float
    vocab_size: int = 4096
    # Paper-style groups: dense early layers, then groups of 3, with as many anchors as groups of 2 have,
    # so the two compare at the same KV cache.
    paper_groups: str = "dense:2,every:3"

    def groups(self, variant: str) -> str:
        return {
            "dense": "dense",
            "every2": "every:2",
            "every4": "every:4",
            "paper": self.paper_groups,
            "retrofit": RETROFIT_GROUPS,
            "retrofit-unmatched": RETROFIT_GROUPS,
            "dense-muon": "dense",
            "every4-muon": "every:4",
            "switch-early": "dense",
            "switch-late": "dense",
        }[variant]

    def model_fields(self, groups: str) -> dict[str, Any]:
        """``model.config`` of this shape with ``groups``: what a run's YAML and the cost model both take."""
        return {
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "max_seq_len": self.seq_len,
            "sa_groups": groups,
        }

    def model_config(self, groups: str) -> Any:
        """The ``SAConfig`` of this shape with ``groups``, for the analytic costs of ``sa_train.cost``."""
        from sa_train.config import SAConfig

        return SAConfig(**self.model_fields(groups))

    def train_flops_per_token(self, groups: str) -> float:
        from sa_train.cost import training_flops_per_token

        return training_flops_per_token(self.model_config(groups), self.seq_len, causal=True)

    def describe(self) -> str:
        return (
            f"d {self.d_model}, {self.n_layers} layers, {self.n_heads} heads ({self.n_kv_heads} KV), "
            f"vocab {self.vocab_size}, seq {self.seq_len}, batch {self.batch_size}, peak lr {self.lr:g}"
        )


SHAPES = {
    # CPU: the tiny config's family at half width and half the batch. One training step costs a quarter
    # of sa-tiny's on one thread (0.2 s instead of 1.4 s for the dense twin), which is what lets 16 runs
    # and 4 retrofits fit in ~35 minutes on one core.
    "small": Shape("small", 128, 8, 4, 2, 256, 4, 3e-3),
    # CUDA: the issue's two shapes, configs/sa-tiny.yaml at batch 16 and the wider model.
    "tiny": Shape("tiny", 256, 8, 8, 4, 256, 16, 3e-3),
    "wide": Shape("wide", 512, 12, 8, 4, 256, 16, 1e-3, paper_groups="dense:3,every:3"),
    # --smoke: the smallest model that still has 8 layers for the paper-style groups.
    "micro": Shape("micro", 32, 8, 2, 1, 32, 2, 3e-3, vocab_size=512),
}


@dataclass(frozen=True)
class Scale:
    """Where and on what a study runs: its shapes, its corpus and the trainer's device settings."""

    shapes: tuple[str, ...]
    works: int | None  # the first N works of the shipped corpus; None: all of it
    accelerator: str
    precision: str
    threads: int | None  # OMP/MKL threads of every run; None leaves the default
    log_every: int
    chars_per_work: int | None = None  # keep only the start of each work (smoke)
    val_batches: float | int = 1.0  # trainer.limit_val_batches: the whole val split but in smoke


SCALES = {
    # 7 works: the default split holds out coriolanus (val) and hamlet (test), leaving 5 plays (~180k
    # tokens) for training, so a pass takes ~40 s on one core and three passes ~2 minutes.
    "cpu": Scale(("small",), 7, "cpu", "32-true", 1, 5),
    "cuda": Scale(("tiny", "wide"), None, "gpu", "bf16-mixed", None, 5),
    # A pipeline check, not a measurement: 20k characters of 3 works and 4 validation batches.
    "smoke": Scale(("micro",), 3, "cpu", "32-true", 1, 1, chars_per_work=20_000, val_batches=4),
}


@dataclass
class Run:
    """One fit of the study (a from-scratch run or a retrofit's fine-tune) and what it measured."""

    shape: str
    variant: str
    seed: int
    passes: int
    groups: str
    steps: int
    train_tokens: int
    name: str
    val_every: int  # steps between validations: a fraction of a pass, or the whole fine-tune
    dense_tokens: int = 0  # retrofit: tokens of the dense run it was converted from
    optimizer: str = "adamw"  # model.optimizer
    switch_at: int | None = None  # model.sa_switch.at_step: dense steps before becoming SWITCH_GROUPS
    results: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataStats:
    """Split sizes of a prepared corpus, from which a pass's steps and tokens follow."""

    train_tokens: int
    val_tokens: int
    samples: int  # packed training samples of seq_len + 1 tokens

    def steps_per_pass(self, batch_size: int) -> int:
        return math.ceil(self.samples / batch_size)

    def tokens_in(self, steps: int, batch_size: int, seq_len: int) -> int:
        """Training tokens of the first ``steps`` steps: a pass ends with a short batch."""
        passes, rest = divmod(steps, self.steps_per_pass(batch_size))
        return (passes * self.samples + min(rest * batch_size, self.samples)) * seq_len
