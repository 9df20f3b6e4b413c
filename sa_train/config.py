"""SAConfig: the model's shape, declared as plain data, shared-attention groups included.

The groups are part of the architecture, not a training trick, so they are declared up front and
normalised to one canonical form: a list of groups of consecutive layer indices covering every layer
in order. The first layer of a group is its *anchor* (it computes Q, K and the attention weights);
the others are *shared* layers that reuse the anchor's weights with their own values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import yaml

from sa_train.errors import ConfigError

GroupSpec = str | list[list[int]]
AttentionBackendName = Literal["auto", "torch", "triton", "reference"]
# The names a config may give; sa_train.attention.BACKENDS implements each but "auto", which it resolves.
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackendName)

SHORTHAND_HELP = (
    "Use 'dense' (every layer its own group), 'every:G' (an anchor every G layers) or "
    "'dense:D,every:G' (D dense layers first, then groups of G), or an explicit list of groups such "
    "as [[0], [1, 2, 3], [4, 5]]."
)


def parse_groups(spec: GroupSpec, n_layers: int) -> list[list[int]]:
    """Turn a group spec (shorthand string or explicit list) into the canonical list of groups."""
    if isinstance(spec, str):
        groups = _expand_shorthand(spec.strip(), n_layers)
    else:
        groups = [list(group) for group in spec]
    _validate_groups(groups, n_layers)
    return groups


def _expand_shorthand(spec: str, n_layers: int) -> list[list[int]]:
    if spec.startswith("["):  # a list that the command line's type check passed on as text
        try:
            groups = yaml.safe_load(spec)
        except yaml.YAMLError:
            groups = None
        if not isinstance(groups, list) or not all(isinstance(group, list) for group in groups):
            raise ConfigError(
                f"model.config.sa_groups={spec} is not a list of groups; groups are lists of layers, e.g. "
                f"[[0, 1], [2, 3]]. {SHORTHAND_HELP}"
            )
        return groups
    dense, every = 0, 1
    if spec != "dense":
        for part in spec.split(","):
            key, _, value = part.strip().partition(":")
            if key not in ("dense", "every") or not value.strip().isdigit():
                raise ConfigError(
                    f"model.config.sa_groups: cannot read {spec!r} (at {part.strip()!r}). {SHORTHAND_HELP}"
                )
            if key == "dense":
                dense = int(value)
            else:
                every = int(value)
        if every < 1:
            raise ConfigError(
                f"model.config.sa_groups: group size in {spec!r} must be at least 1. {SHORTHAND_HELP}"
            )
        if dense > n_layers:
            raise ConfigError(
                f"model.config.sa_groups: {spec!r} asks for {dense} dense layers but the model has n_layers="
                f"{n_layers}; lower the dense count."
            )
    groups = [[layer] for layer in range(dense)]
    groups += [list(range(start, min(start + every, n_layers))) for start in range(dense, n_layers, every)]
    return groups


def _validate_groups(groups: list[list[int]], n_layers: int) -> None:
    expected = 0
    for index, group in enumerate(groups):
        if not group:
            raise ConfigError(
                f"model.config.sa_groups: group {index} is empty; every group needs at least one layer."
            )
        for layer in group:
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise ConfigError(
                    f"model.config.sa_groups: group {index} holds {layer!r}; layer indices are integers."
                )
            if not 0 <= layer < n_layers:
                raise ConfigError(
                    f"model.config.sa_groups: layer {layer} in group {index} is out of range for n_layers="
                    f"{n_layers} (valid: 0..{n_layers - 1})."
                )
            if layer != expected:
                problem = (
                    "overlaps an earlier group or repeats" if layer < expected else f"skips layer {expected}"
                )
                raise ConfigError(
                    f"model.config.sa_groups: group {index} {group} {problem}; groups must list consecutive "
                    f"layers 0..{n_layers - 1} in order, each exactly once."
                )
            expected += 1
    if expected != n_layers:
        raise ConfigError(
            f"model.config.sa_groups: the groups cover layers 0..{expected - 1} but n_layers={n_layers}; "
            f"add groups for layers {expected}..{n_layers - 1}. {SHORTHAND_HELP}"
        )


@dataclass
class SAConfig:
    """Architecture of a Shared-Attention decoder (Llama-style: RMSNorm, RoPE, SwiGLU, GQA).

    Args:
        vocab_size: Rows of the embedding and of the output head.
        d_model: Width of the residual stream.
        n_layers: Number of decoder layers.
        n_heads: Query heads; must divide d_model.
        n_kv_heads: Key/value heads for grouped-query attention; must divide n_heads. None = n_heads.
        ffn_hidden: Hidden width of the SwiGLU MLP. None = 8/3·d_model rounded up to a multiple of 64.
        max_seq_len: Longest sequence the RoPE tables cover.
        rope_theta: RoPE base frequency.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: Share the input embedding with the output head.
        init_std: Standard deviation of the normal init; residual output projections use
            init_std / sqrt(2·n_layers) so the residual stream's variance does not grow with depth.
        sa_groups: Shared-attention groups: 'dense', 'every:G', 'dense:D,every:G' or an explicit list
            of groups of consecutive layer indices. Normalised to the explicit list.
        attention_backend: 'auto' (Triton kernels on CUDA, the fastest exact PyTorch path elsewhere),
            'torch', 'triton' or 'reference' (materialised softmax, the definition; slow).
    """

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    sa_groups: GroupSpec = "dense"
    attention_backend: AttentionBackendName = "auto"

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"model.config.{name} must be a positive integer, got {getattr(self, name)}."
                )
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.config.n_heads={self.n_heads} does not divide model.config.d_model={self.d_model}; "
                f"pick n_heads among its divisors (e.g. {_divisors_near(self.d_model, self.n_heads)})."
            )
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.config.n_kv_heads={self.n_kv_heads} does not divide model.config.n_heads="
                f"{self.n_heads}; use a divisor of it (e.g. {_divisors_near(self.n_heads, self.n_kv_heads)})."
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model.config.d_model / model.config.n_heads = {self.head_dim} is odd; RoPE needs an even "
                "head size."
            )
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * -(-8 * self.d_model // (3 * 64))
        if self.ffn_hidden < 1:
            raise ConfigError(
                f"model.config.ffn_hidden must be a positive integer, got {self.ffn_hidden}; leave it unset "
                "(null) for 8/3·d_model rounded up to a multiple of 64."
            )
        for name, minimum, typical in (
            ("rope_theta", 1.0, "10000"),
            ("norm_eps", 0.0, "1e-5"),
            ("init_std", 0.0, "0.02"),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > minimum):
                raise ConfigError(
                    f"model.config.{name} must be a finite number above {minimum:g}, got {value}; a typical "
                    f"value is {typical}."
                )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"model.config.attention_backend={self.attention_backend!r} is unknown; use one of "
                f"{', '.join(ATTENTION_BACKENDS)}."
            )
        self.sa_groups = parse_groups(self.sa_groups, self.n_layers)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def groups(self) -> list[list[int]]:
        """The canonical groups (``sa_groups`` after normalisation)."""
        assert isinstance(self.sa_groups, list)
        return self.sa_groups

    @property
    def anchors(self) -> list[int]:
        """Layers that compute their own attention weights (the first of each group)."""
        return [group[0] for group in self.groups]

    @property
    def is_dense(self) -> bool:
        return all(len(group) == 1 for group in self.groups)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, the canonical groups included; `SAConfig(**d)` rebuilds the same config."""
        return asdict(self)

    def architecture_differences(self, wanted: SAConfig, ignore: tuple[str, ...] = ()) -> list[str]:
        """How ``wanted`` (a run's config) differs from this one (a checkpoint's) in the fields of
        :data:`ARCHITECTURE_FIELDS` outside ``ignore``: ``model.config.<field> is <this> there, <wanted>
        here`` each. Resume, ``model.init_from`` and ``convert`` all decide with it."""
        return [
            f"model.config.{name} is {getattr(self, name)} there, {getattr(wanted, name)} here"
            for name in ARCHITECTURE_FIELDS
            if name not in ignore and getattr(self, name) != getattr(wanted, name)
        ]


# What a model is, apart from how it runs and how it was first drawn: configs that agree on these hold
# interchangeable weights that compute the same function. Not in it: attention_backend (how attention is
# computed), init_std (the initial draw only) and max_seq_len (rotary positions are computed, not learned,
# so a resumed run or a fine-tune may use another context).
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_hidden",
    "rope_theta",
    "norm_eps",
    "tie_embeddings",
    "sa_groups",
)


_INTEGERS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len")
_NUMBERS = ("rope_theta", "norm_eps", "init_std")


def _check_types(config: SAConfig) -> None:
    """Values of the wrong type (a list, a string, a bool where a number belongs: a hand-edited YAML or a
    Hugging Face config.json) fail as one message naming the field, not as a TypeError from a comparison."""
    for name in _INTEGERS + _NUMBERS:
        value = getattr(config, name)
        if value is None and name in ("n_kv_heads", "ffn_hidden"):
            continue
        kinds = (int,) if name in _INTEGERS else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = "a whole number" if name in _INTEGERS else "a number"
            raise ConfigError(f"model.config.{name} must be {kind}, got {value!r} ({type(value).__name__}).")
    if not isinstance(config.tie_embeddings, bool):
        raise ConfigError(
            f"model.config.tie_embeddings must be true or false, got {config.tie_embeddings!r}."
        )
    if isinstance(config.sa_groups, list) and not all(isinstance(group, list) for group in config.sa_groups):
        raise ConfigError(
            f"model.config.sa_groups={config.sa_groups!r} is a flat list; groups are lists of layers, e.g. "
            f"[[0, 1], [2, 3]]. {SHORTHAND_HELP}"
        )


def _divisors_near(n: int, target: int) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    closest = sorted(divisors, key=lambda d: abs(d - target))[:3]
    return ", ".join(str(d) for d in sorted(closest))
