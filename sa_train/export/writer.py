"""Write a sa_train checkpoint as a Hugging Face model folder.

A dense model becomes a plain ``LlamaForCausalLM``; an SA model becomes ``SALlamaForCausalLM``, whose
configuration and modeling files (``sa_train/export/remote/``) transformers' ``save_pretrained`` copies
into the folder with an ``auto_map``, so ``trust_remote_code=True`` loads it without sa_train. Its
``config.json`` names no ``architectures``: ``transformers serve`` (5.25) loads a model whose config names
one as ``getattr(transformers, name)``, ignoring ``auto_map``, and dies with "module transformers has no
attribute SALlamaForCausalLM"; without it, it loads through ``AutoModelForCausalLM``, as everything else
that reads the folder does. Weights
go through ``save_pretrained`` as safetensors (sharded above ``max_shard_size``), the tokenizer through
``PreTrainedTokenizerFast``: nothing is pickled. Everything is written to a hidden folder beside the
output, which is renamed into place only when complete; what a killed export left there (its pid is dead)
is removed by the next export into the same parent folder. The folder and files follow the umask.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from sa_train.atomic_files import (
    disk_full_error,
    is_disk_full,
    remove_stale_temp_files,
    tensor_bytes,
    writer_path,
)
from sa_train.checkpoint import ModelCheckpoint, read_checkpoint
from sa_train.config import SAConfig
from sa_train.dtypes import DTYPES
from sa_train.errors import CheckpointError, ConfigError
from sa_train.export.card import model_card
from sa_train.export.hf_names import hf_config_fields, to_hf_state_dict
from sa_train.export.remote.configuration_sa_llama import SALlamaConfig
from sa_train.export.remote.modeling_sa_llama import SALlamaForCausalLM

# The fp32 350M model (1.4 GB) stays one file; larger exports are split into shards of at most this size.
MAX_SHARD_SIZE = "2GB"


def check_output_folder(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse a file, a non-empty folder without ``overwrite``, and a folder that holds the checkpoint."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give the path of a folder to create for the export.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"--out: the folder {out} exists and is not empty. Choose a new folder, or pass --overwrite to "
            "replace its contents with the export."
        )
    if out.is_dir() and checkpoint.resolve().is_relative_to(out.resolve()):
        raise ConfigError(
            f"--out: {out} holds the checkpoint {checkpoint}, which replacing the folder would delete; "
            "export to another folder."
        )


def hf_model(
    config: SAConfig, state_dict: dict[str, torch.Tensor], eos_id: int, source: Path
) -> PreTrainedModel:
    """The transformers model holding ``state_dict``: LlamaForCausalLM if dense, SALlamaForCausalLM if not."""
    special = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    fields = {**hf_config_fields(config), **special}
    if config.is_dense:
        model: PreTrainedModel = LlamaForCausalLM(LlamaConfig(**fields))
    else:
        SALlamaConfig.register_for_auto_class()
        SALlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        model = SALlamaForCausalLM(SALlamaConfig(**fields, sa_groups=config.groups))
    try:
        model.load_state_dict(to_hf_state_dict(state_dict), strict=True)
    except RuntimeError as error:  # missing, unexpected or mis-shaped weights
        problems = " ".join(str(error).split())
        raise CheckpointError(
            f"{source}: its weights do not match the architecture it declares ({problems[:300]}). The file "
            "was edited or written by another version of sa_train; export a checkpoint written by "
            "`python -m sa_train fit`."
        ) from error
    model.generation_config = GenerationConfig(**special)
    return model.eval()


def hf_tokenizer(saved: ModelCheckpoint) -> tuple[PreTrainedTokenizerFast, int]:
    """The run's tokenizer with its end-of-text token as bos, eos and pad; and that token's id.

    It adds the bos token in front of every text it encodes, so ``tokenizer(prompt)`` gives the ids
    :meth:`sa_train.text.TextModel.encode` gives, and transformers' ``generate`` continues a prompt as
    ``sa_train generate`` does (the prompt convention of :mod:`sa_train.text`).
    """
    tokenizer = saved.tokenizer("export it with the model")
    eos_id = saved.eos_token_id(tokenizer)
    eos = tokenizer.id_to_token(eos_id)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=eos,
        eos_token=eos,
        pad_token=eos,
        add_bos_token=True,
        model_max_length=saved.config.max_seq_len,
    )
    return wrapped, eos_id


def _drop_architectures(config_json: Path) -> None:
    """Remove ``architectures`` from a remote-code config: loaders then find the class by ``auto_map``."""
    config = json.loads(config_json.read_text(encoding="utf-8"))
    del config["architectures"]
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; a previous ``out`` is moved aside first, removed after."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = writer_path(out, "old")
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _follow_umask(folder: Path) -> None:
    """Give the files under ``folder`` the mode of any file the user writes (0o666 less the umask).

    ``folder`` was made with ``os.mkdir(.., 0o777)``, so its mode is 0o777 less the umask; transformers saved
    the weights 0600 whatever the umask, which hid exports from the owner's group on a cluster.
    """
    folder_mode = stat.S_IMODE(folder.stat().st_mode)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(folder_mode if path.is_dir() else folder_mode & 0o666)


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    dtype: str = "fp32",
    overwrite: bool = False,
    max_shard_size: str | int = MAX_SHARD_SIZE,
) -> Path:
    """Write ``checkpoint`` as a Hugging Face model folder at ``out``; returns ``out``.

    ``dtype`` (fp32, bf16, fp16) is the type of the saved weights. Raises CheckpointError for a bad
    checkpoint and ConfigError for an unusable output folder, before anything is written.
    """
    checkpoint, out = Path(checkpoint), Path(out).absolute()  # "." has no name for the temporary folder
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    check_output_folder(out, checkpoint, overwrite)
    saved = read_checkpoint(checkpoint)
    tokenizer, eos_id = hf_tokenizer(saved)
    model = hf_model(saved.config, saved.state_dict, eos_id, checkpoint).to(DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out.parent)  # staging and moved-aside folders of killed exports
    staging = writer_path(out)
    staging.mkdir(0o777)
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if not saved.config.is_dense:
            _drop_architectures(staging / "config.json")
        tokenizer.save_pretrained(staging)
        card = model_card(saved.config, out.name, checkpoint.name, saved.global_step, dtype)
        card.save(staging / "README.md")
        _follow_umask(staging)
        _move_into_place(staging, out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        needed = tensor_bytes(model.state_dict())
        if is_disk_full(error, out.parent, needed):
            raise disk_full_error(out, needed, "export") from error
        raise
    return out
