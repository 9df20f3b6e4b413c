"""The trainer commands (fit, validate, test): sa_train's LightningCLI and its pre-flight checks.

LightningCLI builds the model, the data and the Trainer from a YAML file and ``--section.key`` flags;
:class:`SACLI` adds what sa_train promises on top: one-paragraph errors for bad options (with
suggestions, never an abbreviation taken silently), checks of the data against the model and of the
checkpoint to resume before anything is written, atomic checkpoint writes, and the resolved config
saved into the run folder only once a fit has passed those checks.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from sa_train.atomic_files import remove_stale_temp_files, warn_removed
from sa_train.callbacks import LastStepCheckpoint, StepProgressBar
from sa_train.checkpoint import ModelCheckpoint as SavedModel
from sa_train.checkpoint import read_checkpoint
from sa_train.checkpoint_io import AtomicCheckpointIO, relink_last_checkpoint
from sa_train.config import SAConfig
from sa_train.data import TokenDataModule
from sa_train.errors import CheckpointError, ConfigError
from sa_train.run_folders import checkpoint_folders, claim_run_folder
from sa_train.sa_switch import SWITCH_KEY
from sa_train.strategies import DeepSpeedPrecisionScalingOnce, check_deepspeed_offload
from sa_train.tools import suggestions
from sa_train.training import CausalLM, check_data_fits_model

# Values of ckpt_path that Lightning resolves itself rather than reading as a path.
LIGHTNING_CKPT_KEYWORDS = {"last", "best", "hpc", "registry"}

# Strategies that save checkpoint folders themselves instead of handing a dict to a CheckpointIO.
SELF_WRITING_STRATEGIES = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)

TRAINER_COMMANDS = {
    "fit": "train a model (resume with --ckpt_path)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split (documents no other command reads)",
}


class SAArgumentParser(LightningArgumentParser):
    """Parse errors as one paragraph: what is wrong and where the options are, no usage dump.

    Abbreviations are refused: with argparse's default, ``--model.config.n_layer 4`` silently set
    ``n_layers`` and a typo could change an experiment without a word.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        hint = suggestions(message, parser)
        sys.stderr.write(
            f"error: {one_paragraph(message)}{hint}\nRun `{prog} --help` for the accepted options.\n"
        )
        self.exit(2)


def one_paragraph(message: str) -> str:
    """jsonargparse's tree of a value no type of a field accepts (9 to 80 lines for unions and class paths),
    as one line: the field, the value given, and what each accepted type expected."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if "\n" not in message or not keys:
        return message
    given = re.search(r"Given value: (.*)", message) or re.search(r"Got value: (.*)", message)
    value = given.group(1) if given else "?"
    nested = re.search(r"NestedArg\(key='[^']*', val='(.*)'\)", value)
    value = nested.group(1) if nested else value
    reasons = []
    lines = message.splitlines()
    for i, line in enumerate(lines):
        text = line.strip().removeprefix("- ")
        if text.startswith("Expected a "):
            reason = text.removeprefix("Expected a ").rstrip(".")
            reason = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", reason).replace("NoneType", "null")
            reason = re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", reason)
            reasons.append(f"expected {reason.split('. Got value')[0]}")
        elif text.startswith("Problem with given class_path") and i + 1 < len(lines):
            detail = lines[i + 1].strip()
            if not detail.startswith("Parser key"):
                reasons.append(f"{text.split(':')[0].removeprefix('Problem with given ')}: {detail}")
        elif text.endswith("is not accepted"):
            reasons.append(text)
    unique = list(dict.fromkeys(reasons))
    return f"{'.'.join(keys)}={value} is not accepted" + (f" ({'; '.join(unique)})" if unique else "")


def check_sections(config: Namespace, sections: Sequence[str]) -> None:
    """Sections given as something other than a mapping (a list, a string) fail here, named, instead of as a
    TypeError from deep inside jsonargparse's instantiation."""
    for section in sections:
        value = config.get(section)
        if value is not None and not isinstance(value, Namespace | dict):
            raise ConfigError(
                f"{section} is a {type(value).__name__} ({str(value)[:60]}) in the config, but it must be a "
                f"mapping of settings (`key: value` lines indented under `{section.split('.')[-1]}:`), as in "
                "configs/sa-tiny.yaml."
            )


def check_architecture(path: str, wanted: SAConfig, switching: bool = False) -> SavedModel:
    """``--ckpt_path`` read; fails unless it is a readable sa_train checkpoint of ``wanted``'s weight
    shapes. A run with ``model.sa_switch`` (``switching``) may be past its switch: then the groups are
    those the checkpoint records it switched to."""
    try:
        saved = read_checkpoint(path)
    except CheckpointError as error:
        raise ConfigError(f"ckpt_path: {error}") from error
    switched = (
        switching and Path(path).is_file() and SWITCH_KEY in torch.load(path, weights_only=True, mmap=True)
    )
    differ = saved.config.architecture_differences(wanted, ignore=("sa_groups",) if switched else ())
    if differ:
        raise ConfigError(
            f"ckpt_path: {path} holds a different architecture than the config: {'; '.join(differ)}. Use "
            "the config the checkpoint was trained with (config.yaml in its run folder), or drop "
            "--ckpt_path to train this architecture from scratch."
        )
    return saved


class SaveConfigAfterChecks(SaveConfigCallback):
    """Saves the resolved config into the run folder once ``fit`` has passed its pre-flight checks.

    Lightning's callback writes it at setup, before the model's own checks, so a refused fit left a run
    folder holding only ``config.yaml``. ``validate`` and ``test`` report on a run; they save no config.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Deferred to :meth:`on_fit_start`."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "fit")


class SACLI(LightningCLI):
    """LightningCLI wired to sa_train's module and data, with atomic checkpoint writes."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            CausalLM,
            TokenDataModule,
            seed_everything_default=1234,
            # Step-based runs: val_check_interval counts optimizer steps across epochs, so a run whose
            # interval exceeds one epoch validates instead of failing Lightning's per-epoch check.
            # Lightning's model summary prints a FLOPs column of zeros for this model (the FLOP-counting
            # forward it needs made Dynamo skip the model); InferenceCost prints sizes and costs instead.
            trainer_defaults={"check_val_every_n_epoch": None, "enable_model_summary": False},
            save_config_callback=SaveConfigAfterChecks,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "python -m sa_train"},
            parser_class=SAArgumentParser,
            # The model builds its own AdamW and schedule: a CLI --optimizer would silently replace them.
            auto_configure_optimizers=False,
            args=list(args) if args is not None else None,
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """After parsing, and before LightningCLI itself opens --ckpt_path (for its hyperparameters), fail
        when that is not a readable sa_train checkpoint of the config's architecture; before ``fit``
        resumes, point a ``last.ckpt`` that a kill left one save behind at the newest checkpoint."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand == "fit" and not self.config["fit"].get("config"):
            raise ConfigError(
                "fit needs --config FILE: without one it would train the built-in dense default with no "
                "step limit and no logger. Start from a shipped config and override what differs, e.g. "
                "`python -m sa_train fit --config configs/sa-tiny.yaml` (CPU, minutes) or "
                "configs/sa-350m.yaml (GPUs)."
            )
        check_sections(
            self.config[subcommand] if subcommand else self.config,
            ("model", "model.config", "data", "trainer"),
        )
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_KEYWORDS:
            return
        if subcommand == "fit":
            relink_last_checkpoint(Path(ckpt_path))
        model = self.config[subcommand]["model"]
        saved = check_architecture(
            ckpt_path, SAConfig(**model["config"].as_dict()), bool(model.get("sa_switch"))
        )
        if subcommand == "fit" and not saved.resumable:
            raise ConfigError(
                f"ckpt_path: {ckpt_path} holds model weights only (no optimizer or loop state), as `convert` "
                f"writes them, so a run cannot resume from it. Start a run from its weights with "
                f"--model.init_from {ckpt_path} instead of --ckpt_path."
            )

    def before_fit(self) -> None:
        """Pre-flight checks before the run folder exists (a refused fit leaves none): the data against the
        model, and ``model.init_from``; then the run claims its own ``version_N`` and removes what killed
        checkpoint writers left in the runs folder."""
        check_data_fits_model(self.model.config, self.datamodule)
        init_from = self.model.hparams.get("init_from")
        if init_from and not self.config["fit"].get("ckpt_path"):
            # The model's own loader and architecture rule, run ahead of setup (which loads again, from the
            # page cache): refused there, the run folder already existed.
            try:
                self.model._load_weights(init_from)
            except CheckpointError as error:
                raise ConfigError(f"model.init_from: {error}") from error
        if self.trainer.is_global_zero:
            self._claimed = claim_run_folder(self.trainer.logger)
            for folder in checkpoint_folders(self.trainer):
                warn_removed(remove_stale_temp_files(folder))

    def _run_subcommand(self, subcommand: str) -> None:
        """A fit refused after its folder was claimed (data checks run inside ``trainer.fit``: an unwritable
        data.cache_dir, say) gives the folder back while nothing is in it."""
        self._claimed: Path | None = None
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self._claimed is not None:
                with contextlib.suppress(OSError):  # not empty: the run wrote something worth keeping
                    self._claimed.rmdir()
            raise

    def before_validate(self) -> None:
        self._require_checkpoint("validate")

    def before_test(self) -> None:
        self._require_checkpoint("test")

    def _require_checkpoint(self, command: str) -> None:
        """Evaluating a freshly initialised model reports a loss that means nothing (8.39 on sa-tiny)."""
        if not self.config[command].get("ckpt_path"):
            raise ConfigError(
                f"{command} needs --ckpt_path: the checkpoint to evaluate, e.g. "
                "runs/<name>/version_<N>/checkpoints/last.ckpt (without one it would report on an untrained "
                "model)."
            )

    def _evaluation_outputs(self, callbacks: list[Any]) -> dict[str, Any]:
        """validate/test of a run's checkpoint write their metrics into that run's folder
        (``<run>/validate/metrics.csv``), not a new ``version_N`` beside it, and carry no checkpoint
        callbacks (they save nothing, and Lightning warned that their folder had changed)."""
        outputs: dict[str, Any] = {
            "callbacks": [c for c in callbacks if not isinstance(c, ModelCheckpoint)],
            "enable_checkpointing": False,
        }
        checkpoint = Path(str(self.config[self.subcommand].get("ckpt_path") or ""))
        if checkpoint.parent.name == "checkpoints":
            run = checkpoint.parent.parent
            outputs["logger"] = CSVLogger(save_dir=run, name="", version=self.subcommand)
        return outputs

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Adds a LastStepCheckpoint when the config names no checkpoint callback (Lightning's default one
        saves only at epoch ends, which step-bounded LM runs may never reach), and atomic checkpoint IO where
        the strategy writes through Lightning's CheckpointIO. DeepSpeed (and FSDP, model-parallel) write
        their own checkpoint folders, one shard per rank, and never call a CheckpointIO."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config["trainer"]
        callbacks = trainer_config.get("callbacks") or []
        if trainer_config.get("enable_checkpointing") is False:
            # One flag switches checkpointing off, also when the config lists a checkpoint callback.
            callbacks = kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        if trainer_config.get("enable_checkpointing") is not False and not any(
            isinstance(callback, ModelCheckpoint) for callback in callbacks
        ):
            kwargs["callbacks"] = [*callbacks, LastStepCheckpoint(save_last=True)]
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(callback, ProgressBar) for callback in callbacks
        ):
            kwargs["callbacks"] = [*kwargs.get("callbacks", callbacks), StepProgressBar()]
        _check_gpu_is_there(trainer_config.get("accelerator"))
        interval, accumulate = (
            trainer_config.get("val_check_interval"),
            trainer_config.get("accumulate_grad_batches"),
        )
        if isinstance(interval, int) and isinstance(accumulate, int) and accumulate > 1:
            # Lightning counts val_check_interval in batches; sa_train's configs count it in optimizer steps,
            # like max_steps, warmup_steps and every_n_train_steps (sa-350m accumulates 8 batches per step).
            kwargs["val_check_interval"] = interval * accumulate
        if self.subcommand in ("validate", "test"):
            kwargs.update(self._evaluation_outputs(callbacks))
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except ValueError as error:  # Lightning's answer to an unknown strategy or accelerator name
            raise ConfigError(f"trainer: {error}") from error
        strategy = trainer.strategy
        if (
            isinstance(strategy, DeepSpeedStrategy)
            and not isinstance(trainer.accelerator, CUDAAccelerator)
            and type(strategy).setup_environment is DeepSpeedStrategy.setup_environment
        ):
            raise ConfigError(
                "trainer.strategy: Lightning's DeepSpeed strategy runs only on CUDA GPUs, but this run's "
                f"accelerator is {type(trainer.accelerator).__name__} (CUDA available: "
                f"{torch.cuda.is_available()}). On a CPU-only machine use trainer.strategy=ddp (or auto); "
                "for DeepSpeed run on a machine with NVIDIA GPUs and trainer.accelerator=gpu."
            )
        if self.subcommand == "fit":
            self.model.check_strategy(trainer)
        if isinstance(strategy, DeepSpeedStrategy):
            check_deepspeed_offload(strategy)
            strategy.precision_plugin = DeepSpeedPrecisionScalingOnce(strategy.precision_plugin.precision)
        if isinstance(strategy, DeepSpeedStrategy) and self.datamodule is not None:
            # DeepSpeed wants the micro-batch size; Lightning guesses it from a loader's batch_sampler, which
            # sa_train's resumable loader does not have (Lightning then fails with an AttributeError).
            strategy.config.setdefault("train_micro_batch_size_per_gpu", self.datamodule.batch_size)
        _check_outputs_in_root_dir(trainer)
        plugins = kwargs.get("plugins", trainer_config.get("plugins")) or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not isinstance(strategy, SELF_WRITING_STRATEGIES) and not any(
            isinstance(plugin, CheckpointIO) for plugin in plugins
        ):
            strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def _check_outputs_in_root_dir(trainer: Trainer) -> None:
    """With loggers, the first one's folder decides where metrics and checkpoints go; a
    ``trainer.default_root_dir`` elsewhere would be silently ignored, so the two must agree."""
    root, logger = Path(trainer.default_root_dir).resolve(), trainer.logger  # the first logger decides
    if logger is not None and root != Path.cwd().resolve():
        # CSV and TensorBoard loggers write into save_dir/name (their root_dir), wandb into save_dir.
        folder = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
        if folder and not Path(folder).resolve().is_relative_to(root):
            raise ConfigError(
                f"trainer.default_root_dir={trainer.default_root_dir} but trainer.logger "
                f"({type(logger).__name__}) writes to {folder}, which is where this run's metrics and "
                "checkpoints would go. Set both to the same place, e.g. --trainer.default_root_dir X "
                "--trainer.logger.init_args.save_dir X."
            )


def _check_gpu_is_there(accelerator: Any) -> None:
    """A GPU config on a machine without one: say so and how to run it anyway (Lightning says only "No
    supported gpu backend found!")."""
    if str(accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}: this config asks for a GPU; this machine has no CUDA GPU "
            "(or this torch build has no CUDA). To run it on the CPU anyway, add --trainer.accelerator cpu "
            "--trainer.precision 32-true --trainer.strategy auto (slow at 350M parameters; the tiny configs "
            "are made for CPUs)."
        )
