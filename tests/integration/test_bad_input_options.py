"""The table of bad options and config values: out-of-range model and data fields, config sections of
the wrong type, unknown commands, options and classes, arguments that cannot be parsed or combined. Each
case ends in one paragraph naming the problem and the fix, exit status 2, no traceback. Add a row when a
new kind of bad option or value is handled; bad files and folders are test_bad_input_files' table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from test_bad_input_files import assert_one_paragraph_and_exit_2, checkpoint_with_tokenizer, convert_args


def edited_config(config: Path, change: Callable[[dict], None]) -> Path:
    """``config`` (the tiny run config) with ``change`` applied, written beside it."""
    document = yaml.safe_load(config.read_text())
    change(document)
    path = config.with_name("edited.yaml")
    path.write_text(yaml.safe_dump(document))
    return path


def _set(keys: str, value) -> Callable[[dict], None]:
    def change(document: dict) -> None:
        *parents, last = keys.split(".")
        for key in parents:
            document = document[key]
        document[last] = value

    return change


# (case id, arguments after `python -m sa_train` given the test folder and a tiny config, expected text)
CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    (
        "rope_theta",
        lambda d, c: ["fit", f"--config={c}", "--model.config.rope_theta=-10000"],
        "model.config.rope_theta",
    ),
    (
        "norm_eps",
        lambda d, c: ["fit", f"--config={c}", "--model.config.norm_eps=-1e-5"],
        "model.config.norm_eps",
    ),
    (
        "ffn_hidden",
        lambda d, c: ["fit", f"--config={c}", "--model.config.ffn_hidden=-64"],
        "model.config.ffn_hidden",
    ),
    (
        "init_std",
        lambda d, c: ["fit", f"--config={c}", "--model.config.init_std=-0.02"],
        "model.config.init_std",
    ),
    ("num_proc", lambda d, c: ["fit", f"--config={c}", "--data.num_proc=-2"], "data.num_proc"),
    (
        "convert-checkpoint-and-hf",
        lambda d, c: convert_args(["--checkpoint", str(d / "dense.ckpt"), "--hf", str(d / "llama")], d),
        "argument --hf: not allowed with argument --checkpoint",
    ),
    (
        "convert-no-source",
        lambda d, c: convert_args([], d),
        "one of the arguments --checkpoint --hf is required",
    ),
    (
        "cost-section-list",
        lambda d, c: ["cost", f"--config={edited_config(c, _set('data', [1]))}"],
        "data is a list ([1]) in the config, but it must be a mapping",
    ),
    (
        "prepare-section-list",
        lambda d, c: ["prepare", f"--config={edited_config(c, _set('data', [1]))}"],
        "data is a list",
    ),
    (
        "fit-section-list",
        lambda d, c: ["fit", f"--config={edited_config(c, _set('data', [1]))}"],
        "data is a list",
    ),
    (
        "fit-model-config-list",
        lambda d, c: ["fit", f"--config={edited_config(c, _set('model.config', [1]))}"],
        "model.config is a list",
    ),
    (
        "fit-yaml-wrong-type",
        lambda d, c: ["fit", f"--config={edited_config(c, _set('model.config.n_layers', 'four'))}"],
        "model.config.n_layers=four is not accepted (expected int)",
    ),
    (
        "generate-prompt-not-utf8",
        lambda d, c: ["generate", f"--checkpoint={checkpoint_with_tokenizer(d)}", "--prompt=to \udce9 be"],
        "--prompt is not UTF-8 text",
    ),
    (
        "generate-unknown-device",
        lambda d, c: [
            "generate",
            f"--checkpoint={checkpoint_with_tokenizer(d)}",
            "--prompt=x",
            "--device=tpu9",
        ],
        "--device tpu9: not a device torch knows",
    ),
    (
        "analyze-threshold",
        lambda d, c: ["analyze", f"--checkpoint={d / 'x.ckpt'}", f"--out={d}", "--threshold=1.5"],
        "--threshold=1.5",
    ),
    (
        "analyze-threshold-nan",
        lambda d, c: ["analyze", f"--checkpoint={d / 'x.ckpt'}", f"--out={d}", "--threshold=nan"],
        "--threshold=nan",
    ),
    ("convert-negative-tokens", lambda d, c: convert_args(["--hf", str(d), "--tokens=-5"], d), "--tokens=-5"),
    (
        "cost-negative-seq_len",
        lambda d, c: ["cost", f"--config={edited_config(c, _set('data.seq_len', -5))}"],
        "data.seq_len=-5",
    ),
    ("cost-context", lambda d, c: ["cost", f"--config={c}", "--context=100000"], "--context=100000"),
    ("bench-batch-0", lambda d, c: ["bench", "--batch=0"], "--batch=0 must be at least 1"),
    ("bench-rounds-0", lambda d, c: ["bench", "--rounds=0"], "--rounds=0 must be at least 1"),
    ("bench-prompts", lambda d, c: ["bench", "--prompts=-1"], "--prompts='-1' must be positive"),
    ("plot-smooth-0", lambda d, c: ["plot", str(d), "--smooth=0"], "--smooth=0 must be at least 1"),
    ("plot-format", lambda d, c: ["plot", str(d), f"--out={d / 'loss.xyz'}"], "matplotlib writes no .xyz"),
    ("tool-parse-error", lambda d, c: ["generate", "--checkpoint"], "expected one argument"),
    ("tool-unknown-option", lambda d, c: ["cost", f"--config={c}", "--jsn"], "Did you mean --json"),
    (
        "cost-unknown-override",
        lambda d, c: ["cost", f"--config={c}", "--model.config.n_layer=4"],
        "Did you mean --model.config.n_layers",
    ),
    ("unknown-command", lambda d, c: ["fitt"], "unknown command 'fitt'. Did you mean fit?"),
    (
        "precision",
        lambda d, c: ["fit", f"--config={c}", "--trainer.precision=bf17"],
        "trainer.precision=bf17",
    ),
    (
        "sa_groups-flat-list",
        lambda d, c: ["fit", f"--config={c}", "--model.config.sa_groups=[0,1,2,3]"],
        "model.config.sa_groups=[0,1,2,3] is not a list of groups",
    ),
    (
        "sa_groups-not-integers",
        lambda d, c: ["fit", f"--config={c}", "--model.config.sa_groups=[[0,1.5],[2,3]]"],
        "layer indices are integers",
    ),
    (
        "logger-class",
        lambda d, c: ["fit", f"--config={c}", "--trainer.logger.class_path=lightning.pytorch.loggers.NoSuch"],
        "has no attribute 'NoSuch'",
    ),
    ("seed", lambda d, c: ["fit", f"--config={c}", "--seed_everything=abc"], "seed_everything=abc"),
    ("no-config", lambda d, c: ["fit", "--trainer.max_steps=3"], "fit needs --config FILE"),
    (
        "sa_switch-out-of-range",
        lambda d, c: [
            "fit",
            f"--config={c}",
            "--model.config.sa_groups=dense",
            "--model.sa_switch.at_step=2",
            "--model.sa_switch.kv_budget=1.5",
        ],
        "model.sa_switch.kv_budget=1.5 must lie in (0, 1)",
    ),
    (
        "callback-argument",
        lambda d, c: [
            "fit",
            f"--config={c}",
            "--trainer.callbacks+=LearningRateMonitor",
            "--trainer.callbacks.logging_interval=weekly",
        ],
        "trainer.callbacks.logging_interval=weekly is not accepted (expected one of 'step', 'epoch'",
    ),
]


@pytest.mark.parametrize("args, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_paragraph_and_exit_2(tmp_path, small_corpus, capsys, args, expected):
    assert_one_paragraph_and_exit_2(tmp_path, small_corpus, capsys, args, expected)
