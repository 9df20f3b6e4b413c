"""Read a local Hugging Face Llama folder as a dense sa_train model: the input of ``convert --hf``.

The folder is what ``save_pretrained`` writes: ``config.json``, the weights (``model.safetensors``, its
shards with ``model.safetensors.index.json``, or ``pytorch_model.bin`` and its shards, read by torch's
``weights_only`` unpickler, which builds tensors and nothing else) and the fast tokenizer's
``tokenizer.json``. Config and names go
through :mod:`sa_train.export.hf_names`, the table export writes with, so import and export cannot drift
apart. Nothing here imports transformers: a folder is plain JSON and tensors, and convert runs with the
core dependencies alone. The result is the :class:`~sa_train.checkpoint.ModelCheckpoint` that
``read_checkpoint`` returns for a dense checkpoint, so the rest of convert does not know where it came from.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from sa_train.checkpoint import ModelCheckpoint
from sa_train.config import SAConfig
from sa_train.errors import CheckpointError
from sa_train.export.hf_names import hf_weight_name, sa_config_from_hf, sa_weight_name
from sa_train.model import SAModel

# (single file, index of its shards), in the order transformers prefers them.
WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
# RoPE tables that transformers before 4.31 saved as weights; they follow from the config, and transformers
# itself skips them on load.
DERIVED_WEIGHTS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
FOLDER_HELP = (
    "--hf takes a folder written by save_pretrained: config.json, model.safetensors (or its shards with "
    "model.safetensors.index.json, or pytorch_model.bin) and tokenizer.json."
)


def read_hf_folder(folder: str | os.PathLike[str]) -> ModelCheckpoint:
    """The dense model of a Llama folder, with its tokenizer; the config and the tokenizer are checked before
    any weight is read. Raises ConfigError for a model SAModel cannot compute exactly and CheckpointError for
    missing or unreadable files and weights that do not fit the config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"--hf: no folder at {folder}. {FOLDER_HELP}")
    config = sa_config_from_hf(_read_json(folder / "config.json"), str(folder / "config.json"))
    tokenizer_json = _read_tokenizer(folder, config)
    state = _to_sa_state_dict(_read_weights(folder), config, folder)
    return ModelCheckpoint(
        path=folder, config=config, state_dict=state, tokenizer_json=tokenizer_json, global_step=None
    )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"no {path.name} in {path.parent}. {FOLDER_HELP}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not JSON ({error}). {FOLDER_HELP}") from error


def _read_tokenizer(folder: Path, config: SAConfig) -> str:
    """tokenizer.json's text: convert tokenizes its held-out text with it, and the checkpoint carries it."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"no tokenizer.json in {folder}; convert reads held-out text with the model's tokenizer and "
            "stores it in the checkpoint it writes. Save the model's fast tokenizer into the folder "
            "(AutoTokenizer.from_pretrained(...).save_pretrained(folder) writes tokenizer.json)."
        )
    text = path.read_text(encoding="utf-8")
    try:
        size = Tokenizer.from_str(text).get_vocab_size()
    except Exception as error:  # the tokenizers parser raises plain Exceptions
        raise CheckpointError(
            f"{path} is not a tokenizer.json the tokenizers library reads ({error}). Save the model's fast "
            "tokenizer again with save_pretrained."
        ) from error
    if size > config.vocab_size:
        raise CheckpointError(
            f"{path} has {size} tokens but config.json's vocab_size is {config.vocab_size}, so some tokens "
            "have no embedding; the tokenizer belongs to another model. Give the folder's own tokenizer."
        )
    return text


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for single, index in WEIGHT_FILES:
        if (folder / single).is_file():
            return _read_weight_file(folder / single)
        if (folder / index).is_file():
            shards = sorted(set(_read_json(folder / index).get("weight_map", {}).values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise CheckpointError(
                        f"{folder / index} names the shard {shard}, which is not in the folder; copy every "
                        "shard beside the index."
                    )
                state.update(_read_weight_file(folder / shard))
            return state
    files = ", ".join(name for pair in WEIGHT_FILES for name in pair)
    raise CheckpointError(f"{folder} holds no weights (none of {files}). {FOLDER_HELP}")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # safetensors and torch's unpickler raise many kinds
        raise CheckpointError(
            f"{path} cannot be read as weights ({error}). The file is truncated or damaged; copy it again."
        ) from error


def _to_sa_state_dict(
    weights: dict[str, torch.Tensor], config: SAConfig, folder: Path
) -> dict[str, torch.Tensor]:
    """The weights under SAModel's names, checked against the shapes of the model config.json describes."""
    with torch.device("meta"):
        expected = SAModel(config).state_dict()
    state, unknown = {}, []
    for hf_name, tensor in weights.items():
        name = sa_weight_name(hf_name)
        if name is not None:
            state[name] = tensor
        elif not DERIVED_WEIGHTS.fullmatch(hf_name):
            unknown.append(hf_name)
    if config.tie_embeddings and "embed.weight" in state:
        # Tied, the output head is the embedding, whatever the file holds (save_pretrained omits it).
        state["lm_head.weight"] = state["embed.weight"]
    problems = [
        *(f"missing {hf_weight_name(name)}" for name in expected if name not in state),
        *(f"unexpected {name}" for name in unknown),
        *(f"unexpected {hf_weight_name(name)}" for name in state if name not in expected),
        *(
            f"{hf_weight_name(name)} is {tuple(tensor.shape)}, not {tuple(expected[name].shape)}"
            for name, tensor in state.items()
            if name in expected and tensor.shape != expected[name].shape
        ),
    ]
    if problems:
        shown = "; ".join(problems[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(
            f"{folder}: the weights do not fit the model config.json describes ({shown}). The folder is "
            "incomplete or mixes files of different models; give the folder save_pretrained wrote for one "
            "LlamaForCausalLM."
        )
    return state
