"""The checkpoint layout (sa_train.checkpoint): round trip, and one clear error for each bad file."""

import pytest
import torch

from sa_train import SAConfig, SAModel
from sa_train.atomic_files import atomic_torch_save
from sa_train.checkpoint import MODEL_PREFIX, model_checkpoint, read_checkpoint
from sa_train.errors import CheckpointError
from sa_train.training import CausalLM

CONFIG = SAConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, sa_groups=[[0, 1], [2]], max_seq_len=16)


def lightning_like_checkpoint(model: SAModel, tokenizer_json: str | None = '{"fake": true}') -> dict:
    return model_checkpoint(model, tokenizer_json, global_step=7)


def test_the_model_prefix_is_the_training_modules_and_fit_reads_model_checkpoints_alike():
    """MODEL_PREFIX is the name of CausalLM's model attribute: the keys fit writes are the keys read, and a
    checkpoint of the model alone loads into the training module (its run counters start at zero)."""
    module, alone = CausalLM(CONFIG), model_checkpoint(SAModel(CONFIG), None)
    weights = {name for name in module.state_dict() if name.startswith(MODEL_PREFIX)}
    assert weights == set(alone["state_dict"]) and len(weights) == len(SAModel(CONFIG).state_dict())
    module.on_load_checkpoint(alone)
    module.load_state_dict(alone["state_dict"])
    assert module.tokens_seen == 0 and module.skipped_batches == 0


def test_round_trip_keeps_weights_config_and_tokenizer(tmp_path):
    model = SAModel(CONFIG)
    path = tmp_path / "run.ckpt"
    atomic_torch_save(lightning_like_checkpoint(model), path)

    saved = read_checkpoint(path)
    assert saved.config == CONFIG and saved.global_step == 7 and saved.tokenizer_json == '{"fake": true}'
    loaded = SAModel.from_checkpoint(path)
    assert not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not list(tmp_path.glob(".*.tmp"))


def truncated(tmp_path, model):
    path = tmp_path / "good.ckpt"
    torch.save(lightning_like_checkpoint(model), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def other_groups(tmp_path, model):
    checkpoint = lightning_like_checkpoint(model)
    checkpoint["sa_config"]["sa_groups"] = [[0], [1], [2]]
    path = tmp_path / "other.ckpt"
    torch.save(checkpoint, path)
    return path


def plain_state_dict(tmp_path, model):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    return path


def not_a_checkpoint(tmp_path, model):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are my notes\n")
    return path


def a_folder(tmp_path, model):
    return tmp_path


def missing(tmp_path, model):
    return tmp_path / "nope.ckpt"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (truncated, "cannot be read"),
        (other_groups, "do not match the architecture"),
        (plain_state_dict, "not a sa_train checkpoint"),
        (not_a_checkpoint, "cannot be read"),
        (a_folder, "is a folder"),
        (missing, "no checkpoint at"),
    ],
)
def test_bad_checkpoints_raise_one_clear_error(tmp_path, make, words):
    path = make(tmp_path, SAModel(CONFIG))
    with pytest.raises(CheckpointError, match=words):
        SAModel.from_checkpoint(path)
