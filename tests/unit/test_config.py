"""SAConfig: group shorthands normalise to one canonical form; bad shapes fail with named fields."""

from __future__ import annotations

import pytest

from sa_train import SAConfig
from sa_train.errors import ConfigError


@pytest.mark.parametrize(
    "spec, n_layers, expected",
    [
        ("dense", 3, [[0], [1], [2]]),
        ("every:1", 3, [[0], [1], [2]]),
        ("every:4", 8, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ("every:3", 7, [[0, 1, 2], [3, 4, 5], [6]]),
        ("dense:2,every:3", 8, [[0], [1], [2, 3, 4], [5, 6, 7]]),
        (" every:2 , dense:1 ", 5, [[0], [1, 2], [3, 4]]),
        ([[0], [1, 2, 3]], 4, [[0], [1, 2, 3]]),
    ],
)
def test_group_specs_normalise(spec, n_layers, expected):
    cfg = SAConfig(n_layers=n_layers, sa_groups=spec)
    assert cfg.groups == expected
    assert cfg.sa_groups == expected
    assert cfg.anchors == [group[0] for group in expected]


def test_round_trip_through_plain_data():
    cfg = SAConfig(n_layers=6, n_heads=4, n_kv_heads=2, sa_groups="dense:2,every:2")
    again = SAConfig(**cfg.to_dict())
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_derived_defaults():
    cfg = SAConfig(d_model=256, n_heads=8)
    assert cfg.n_kv_heads == 8
    assert cfg.head_dim == 32
    assert cfg.ffn_hidden == 704  # 8/3 * 256 rounded up to a multiple of 64
    assert cfg.is_dense and not SAConfig(sa_groups="every:2").is_dense


@pytest.mark.parametrize(
    "spec, message",
    [
        ([[0], [2, 3]], "skips layer 1"),
        ([[0, 1], [1, 2, 3]], "overlaps"),
        ([[0, 1], [], [2, 3]], "group 1 is empty"),
        ([[0, 1], [2, 3, 4]], "out of range"),
        ([[0, 1], [2]], "add groups for layers 3..3"),
        ([[1, 0], [2, 3]], "skips layer 0"),
        ("every:0", "at least 1"),
        ("groups-of-4", "cannot read"),
        ("dense:9", "9 dense layers"),
    ],
)
def test_malformed_groups_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        SAConfig(n_layers=4, sa_groups=spec)
    assert "model.config.sa_groups" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=100, n_heads=8), "model.config.n_heads=8 does not divide model.config.d_model=100"),
        (dict(n_heads=8, n_kv_heads=3), "model.config.n_kv_heads=3 does not divide model.config.n_heads=8"),
        (dict(d_model=24, n_heads=8), "odd"),
        (dict(vocab_size=0), "model.config.vocab_size"),
        (dict(attention_backend="cuda-magic"), "model.config.attention_backend"),
    ],
)
def test_bad_shapes_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SAConfig(**kwargs)


def test_architecture_is_decided_once_for_resume_init_from_and_convert():
    saved = SAConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, sa_groups="every:2")
    same = SAConfig(
        vocab_size=64, d_model=32, n_layers=4, n_heads=4, sa_groups=[[0, 1], [2, 3]], max_seq_len=512,
        init_std=0.1, attention_backend="torch",
    )  # fmt: skip
    assert saved.architecture_differences(same) == []  # the context, the initial draw and the backend
    other = SAConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, rope_theta=5e5, norm_eps=1e-6)
    assert saved.architecture_differences(other) == [
        "model.config.rope_theta is 10000.0 there, 500000.0 here",
        "model.config.norm_eps is 1e-05 there, 1e-06 here",
        "model.config.sa_groups is [[0, 1], [2, 3]] there, [[0], [1], [2], [3]] here",
    ]
    assert len(saved.architecture_differences(other, ignore=("sa_groups",))) == 2
