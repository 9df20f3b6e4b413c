"""The checkpoint layout: the one module that knows what a sa_train checkpoint holds.

A checkpoint is Lightning's dict (``state_dict``, optimizer and loop state, ...) plus the entries that make
it self-contained for inference on another machine:

- ``sa_config``: :meth:`SAConfig.to_dict`, the architecture, groups included;
- ``tokenizer``: the text of the run's ``tokenizer.json`` (absent when the run had no data module);
- model weights under ``state_dict`` with the ``model.`` prefix of :class:`CausalLM`'s attribute.

Under DeepSpeed the checkpoint is a folder: ``latest`` names a tag folder holding Lightning's entries (without
``state_dict``) in the rank-0 model-states file, and the weights in ZeRO shards, one per rank.
:func:`read_checkpoint` reads both kinds.

Writers (the LightningModule) call :func:`add_model_entries`; readers (``SAModel.from_checkpoint``,
``generate``, ``export``) call :func:`read_checkpoint`. Everything here is torch only; DeepSpeed is imported
only to read a folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from sa_train.model import SAModel

from sa_train.config import SAConfig
from sa_train.errors import CheckpointError, DataError, SATrainError

CONFIG_KEY = "sa_config"
TOKENIZER_KEY = "tokenizer"
MODEL_PREFIX = "model."


def add_model_entries(checkpoint: dict[str, Any], config: SAConfig, tokenizer_json: str | None) -> None:
    """Add the architecture and the tokenizer to a Lightning checkpoint dict being saved."""
    checkpoint[CONFIG_KEY] = config.to_dict()
    if tokenizer_json is not None:
        checkpoint[TOKENIZER_KEY] = tokenizer_json


def model_checkpoint(
    model: SAModel, tokenizer_json: str | None, global_step: int | None = 0
) -> dict[str, Any]:
    """A checkpoint in fit's layout that holds the model alone (weights, architecture, tokenizer), without
    optimizer or loop state: ``validate``, ``test``, ``export``, ``generate`` and ``model.init_from`` read
    it as they read fit's; ``fit --ckpt_path`` refuses to resume from it. ``convert`` writes these."""
    checkpoint = {
        "state_dict": {MODEL_PREFIX + name: tensor for name, tensor in model.state_dict().items()},
        "pytorch-lightning_version": version("lightning"),  # Lightning reads it when it loads the file
        "epoch": 0,
        "global_step": global_step,
    }
    add_model_entries(checkpoint, model.config, tokenizer_json)
    return checkpoint


@dataclass
class ModelCheckpoint:
    """What inference needs from a checkpoint: the architecture, the weights and the tokenizer."""

    path: Path
    config: SAConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_json: str | None
    global_step: int | None
    resumable: bool = False  # holds the loop state fit resumes from (convert and HF folders: weights only)

    def tokenizer(self, purpose: str) -> Tokenizer:
        """The run's tokenizer this checkpoint carries; CheckpointError naming ``purpose`` (what the caller
        needs it for) when it carries none or it does not parse."""
        from tokenizers import Tokenizer

        if self.tokenizer_json is None:
            raise CheckpointError(
                f"{self.path} holds no tokenizer, and one is needed to {purpose}. It was written without a "
                "data module (or by an older sa_train); use a checkpoint of a `python -m sa_train fit` run, "
                "which stores the run's tokenizer.json in every checkpoint."
            )
        try:
            return Tokenizer.from_str(self.tokenizer_json)
        except Exception as error:  # tokenizers raises a bare Exception for malformed JSON
            raise CheckpointError(
                f"{self.path}: the tokenizer it carries does not parse ({_first_line(error)}). The file was "
                "edited or damaged; use another checkpoint of the run (each one stores the run's tokenizer)."
            ) from error

    def eos_token_id(self, tokenizer: Tokenizer) -> int:
        """The id of ``tokenizer``'s end-of-text token, which separated the documents in training."""
        from sa_train.data.tokenizer import eos_token_id

        try:
            return eos_token_id(tokenizer, str(self.path))
        except DataError as error:
            raise CheckpointError(
                f"{self.path}: the tokenizer it carries has no end-of-text token, which starts every prompt "
                f"and ends every generation ({error})."
            ) from error


RESUMED_FROM = "resumed_from"  # in a resumed run's folder: a link to the folder of the run it continues


def link_resumed_run(run: Path, checkpoint: Path) -> Path | None:
    """Link ``run/resumed_from`` to the run folder that holds ``checkpoint`` (``<run>/checkpoints/<file>``,
    a file or DeepSpeed's folder); returns that folder, or None when the checkpoint lies elsewhere or in
    ``run`` itself. ``plot`` follows the link to draw a resumed run as one curve."""
    previous = checkpoint.parent.parent
    if checkpoint.parent.name != "checkpoints" or previous == run.resolve() or not run.is_dir():
        return None
    link = run / RESUMED_FROM
    if not link.is_symlink():
        link.symlink_to(os.path.relpath(previous, run), target_is_directory=True)
    return previous


def read_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> ModelCheckpoint:
    """Read a sa_train checkpoint: a .ckpt file, or the .ckpt folder fit writes under DeepSpeed.

    Files are read without unpickling arbitrary objects (``weights_only`` loading); DeepSpeed's consolidation
    unpickles a folder's optimizer shards in full, so read only folders you trust.

    Raises :class:`CheckpointError` with the reason and the fix for a missing, truncated or foreign file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"no checkpoint at {path}. Give the path of a .ckpt written by `python -m sa_train fit`, e.g. "
            "runs/<name>/version_<N>/checkpoints/last.ckpt."
        )
    checkpoint = _read_deepspeed_folder(path, map_location) if path.is_dir() else _load(path, map_location)
    if not isinstance(checkpoint, dict) or CONFIG_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a sa_train checkpoint: it has no '{CONFIG_KEY}' and 'state_dict' entries. Use a "
            ".ckpt written by `python -m sa_train fit` (a plain state_dict file holds no architecture)."
        )
    try:
        config = SAConfig(**checkpoint[CONFIG_KEY])
    except (TypeError, SATrainError) as error:
        raise CheckpointError(
            f"{path} holds a model config this version of sa_train cannot build ({error})."
        ) from error
    state = {
        key[len(MODEL_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    return ModelCheckpoint(
        path=path,
        config=config,
        state_dict=state,
        tokenizer_json=checkpoint.get(TOKENIZER_KEY),
        global_step=checkpoint.get("global_step"),
        resumable="loops" in checkpoint,
    )


def read_global_step(path: Path) -> int:
    """The optimizer step a checkpoint file was written at, read lazily (``mmap``); -1 when unreadable (a
    foreign or damaged file never counts as newer)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:
        return -1


def _load(path: Path, map_location: str | torch.device) -> Any:
    """Memory-mapped: reading the config and tokenizer of a large checkpoint touches only their pages, not
    the optimizer state (a resume reads the file to check it before Lightning loads it)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as error:  # torch's unpickler raises anything from IndexError to RuntimeError
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint ({_first_line(error)}). The file is truncated, damaged "
            "or not a PyTorch checkpoint; use another checkpoint of the run (e.g. last.ckpt or a step "
            "checkpoint)."
        ) from error


def _read_deepspeed_folder(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """Lightning's entries from the rank-0 model-states file, and the full fp32 weights merged from the ZeRO
    shards by DeepSpeed's own consolidation (``zero_to_fp32``; under ZeRO-3 the model-states files hold only
    placeholders for the weights)."""
    latest = path / "latest"
    if not latest.is_file():
        hf = (
            f" It looks like a Hugging Face model folder: `python -m sa_train convert --hf {path} --groups "
            "SPEC --out sa.ckpt` turns it into a checkpoint."
            if (path / "config.json").is_file()
            else ""
        )
        raise CheckpointError(
            f"{path} is a folder but not a DeepSpeed checkpoint (it has no 'latest' file). Give a .ckpt file "
            f"written by fit, or a .ckpt folder written by fit under trainer.strategy DeepSpeed.{hf}"
        )
    try:
        from deepspeed.utils import zero_to_fp32
    except ImportError as error:
        raise CheckpointError(
            f"{path} is a DeepSpeed checkpoint folder, and reading one needs DeepSpeed: pip install "
            "'sa_train[deepspeed]' (or convert the folder to one file where DeepSpeed is installed, see "
            "docs/distributed.md)."
        ) from error
    try:
        tag_folder = path / latest.read_text().strip()
        entries = _load(Path(zero_to_fp32.get_model_state_files(tag_folder)[0]), map_location)
        weights = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(path)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: the DeepSpeed checkpoint is incomplete or damaged ({_first_line(error)}). Every rank "
            "writes its own shard into the folder; copy the whole folder, or use another checkpoint of the "
            "run."
        ) from error
    entries.pop("module", None)
    return {**entries, "state_dict": weights}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
