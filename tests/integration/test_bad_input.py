"""The table of bad input: each case ends in one paragraph naming the problem and the fix, exit status 2,
no traceback. Add a row when a new kind of user error is handled."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hf_llama import write_llama_folder
from test_cli import run_cli, tiny_run_config
from tokenizers import Tokenizer, models

from sa_train import SAConfig, SAModel
from sa_train.checkpoint import add_model_entries
from sa_train.data.tokenizer import EOS_TOKEN

# The architecture of tiny_run_config's model, and the same model with other groups.
TINY = SAConfig(
    vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64, sa_groups="every:2"
)
OTHER_GROUPS = SAConfig(**{**TINY.to_dict(), "sa_groups": "dense"})


def _checkpoint(config: SAConfig) -> dict:
    model = SAModel(config)
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 1}
    add_model_entries(checkpoint, config, None)
    return checkpoint


def truncated_checkpoint(folder: Path) -> Path:
    path = folder / "truncated.ckpt"
    torch.save(_checkpoint(TINY), path)
    path.write_bytes(path.read_bytes()[:4000])
    return path


def not_a_checkpoint(folder: Path) -> Path:
    path = folder / "notes.ckpt"
    path.write_text("these are my notes, not a checkpoint\n")
    return path


def checkpoint_of_other_groups(folder: Path) -> Path:
    path = folder / "dense.ckpt"
    torch.save(_checkpoint(OTHER_GROUPS), path)
    return path


def sa_checkpoint(folder: Path) -> Path:
    """Groups every:2, and no record of a dense run switching to them (model.sa_switch)."""
    path = folder / "sa.ckpt"
    torch.save(_checkpoint(TINY), path)
    return path


def plain_state_dict(folder: Path) -> Path:
    path = folder / "weights.pt"
    torch.save(SAModel(TINY).state_dict(), path)
    return path


def blocker(folder: Path) -> Path:
    """A plain file where a folder would have to be created."""
    path = folder / "a-file"
    path.write_text("")
    return path


def binary_config(folder: Path) -> Path:
    path = folder / "config.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def malformed_metrics(folder: Path) -> Path:
    run = folder / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,0,8.1\n0,1,eight\n")
    return run


def metrics_without_training(folder: Path) -> Path:
    run = folder / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,train/loss,val/loss\n")
    return run


def llama_folder(folder: Path, tokenizer: bool = True, **config) -> Path:
    """A Hugging Face Llama folder of ``config`` (see hf_llama), or without its tokenizer.json."""
    path = folder / "llama"
    write_llama_folder(path, tokenizer, **config)
    return path


def llama_with_rope_scaling(folder: Path) -> Path:
    """The rope_scaling entry transformers before 5.0 wrote (Llama 3.1 style), beside a default rope."""
    path = llama_folder(folder)
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (path / "config.json").write_text(json.dumps(config))
    return path


def llama_with_config(folder: Path, **fields) -> Path:
    """A Llama folder whose config.json holds ``fields`` (of the wrong types)."""
    path = llama_folder(folder)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **fields}))
    return path


def _tokenizer_json() -> str:
    vocab = {"<unk>": 0, EOS_TOKEN: 1, "to": 2, "be": 3}
    return Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).to_str()


def checkpoint_with_tokenizer(folder: Path, tokenizer_json: str | None = None) -> Path:
    """A weights-only checkpoint, as convert writes them (no optimizer or loop state), with a tokenizer."""
    path = folder / "weights-only.ckpt"
    checkpoint = _checkpoint(TINY)
    add_model_entries(checkpoint, TINY, tokenizer_json or _tokenizer_json())
    torch.save(checkpoint, path)
    return path


def bad_tokenizer_checkpoint(folder: Path) -> Path:
    return checkpoint_with_tokenizer(folder, "{not a tokenizer")


def jsonl_of_lists(folder: Path) -> Path:
    path = folder / "held-out.jsonl"
    path.write_text('[1, 2]\n"a string"\n')
    return path


def folder_without_tokenizer(folder: Path) -> Path:
    path = folder / "exported"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


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


def convert_args(source: list[str], folder: Path) -> list[str]:
    return ["convert", *source, "--groups", "every:2", f"--out={folder / 'sa.ckpt'}"]


CKPT_CASES = [
    (truncated_checkpoint, "cannot be read as a checkpoint"),
    (not_a_checkpoint, "cannot be read as a checkpoint"),
    (
        checkpoint_of_other_groups,
        "model.config.sa_groups is [[0], [1], [2], [3]] there, [[0, 1], [2, 3]] here",
    ),
    (plain_state_dict, "is not a sa_train checkpoint"),
]

# (case id, arguments after `python -m sa_train` given the test folder and a tiny config, expected text)
CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    *[
        (
            f"{command}-{make.__name__}",
            lambda d, c, m=make, cmd=command: [cmd, f"--config={c}", f"--ckpt_path={m(d)}"],
            text,
        )
        for command in ("fit", "validate")
        for make, text in CKPT_CASES
    ],
    (
        "output-folder",
        lambda d, c: ["fit", f"--config={c}", f"--trainer.logger.init_args.save_dir={blocker(d) / 'runs'}"],
        "a-file/runs",
    ),
    (
        "cache-folder",
        lambda d, c: ["fit", f"--config={c}", f"--data.cache_dir={blocker(d) / 'c'}"],
        "data.cache_dir",
    ),
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
        "binary-config",
        lambda d, c: ["fit", "--config", str(binary_config(d))],
        "config.yaml is not UTF-8 text",
    ),
    (
        "plot-malformed-csv",
        lambda d, c: ["plot", str(malformed_metrics(d)), f"--out={d / 'loss.png'}"],
        "is not a metrics.csv",
    ),
    (
        "convert-hf-rope-scaling",
        lambda d, c: convert_args(["--hf", str(llama_with_rope_scaling(d))], d),
        'rope_scaling asks for RoPE of type "llama3"',
    ),
    (
        "convert-hf-attention-bias",
        lambda d, c: convert_args(["--hf", str(llama_folder(d, attention_bias=True))], d),
        "attention_bias is true",
    ),
    (
        "convert-hf-no-tokenizer",
        lambda d, c: convert_args(["--hf", str(llama_folder(d, tokenizer=False))], d),
        "no tokenizer.json in",
    ),
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
        "plot-no-training",
        lambda d, c: ["plot", str(metrics_without_training(d)), f"--out={d / 'loss.png'}"],
        "holds no train/loss values",
    ),
    # A refused fit from --model.init_from leaves no run folder (the test checks), nor does --ckpt_path given
    # convert's weights-only output.
    *[
        (
            f"fit-init_from-{name}",
            lambda d, c, m=make: ["fit", f"--config={c}", f"--model.init_from={m(d)}"],
            text,
        )
        for name, make, text in [
            ("missing", lambda d: d / "missing.ckpt", "model.init_from: no checkpoint at"),
            ("truncated", truncated_checkpoint, "cannot be read as a checkpoint"),
            ("other-groups", checkpoint_of_other_groups, "model.init_from: "),
            ("hf-folder", llama_folder, "looks like a Hugging Face model folder"),
        ]
    ],
    (
        "fit-ckpt_path-weights-only",
        lambda d, c: ["fit", f"--config={c}", f"--ckpt_path={checkpoint_with_tokenizer(d)}"],
        "Start a run from its weights with --model.init_from",
    ),
    (
        "analyze-jsonl-not-objects",
        lambda d, c: [
            "analyze",
            f"--checkpoint={checkpoint_with_tokenizer(d)}",
            f"--out={d / 'a'}",
            f"--data={jsonl_of_lists(d)}",
        ],
        "line 1 of",
    ),
    (
        "convert-jsonl-not-objects",
        lambda d, c: convert_args(
            [f"--checkpoint={checkpoint_with_tokenizer(d)}", f"--data={jsonl_of_lists(d)}"], d
        ),
        "is a JSON list, not an object",
    ),
    (
        "convert-hf-config-list",
        lambda d, c: convert_args(["--hf", str(llama_with_config(d, hidden_size=[64]))], d),
        "model.config.d_model must be a whole number, got [64]",
    ),
    (
        "convert-hf-config-string",
        lambda d, c: convert_args(["--hf", str(llama_with_config(d, num_hidden_layers="two"))], d),
        "model.config.n_layers must be a whole number, got 'two'",
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
        "generate-bad-tokenizer",
        lambda d, c: ["generate", f"--checkpoint={bad_tokenizer_checkpoint(d)}", "--prompt=to be"],
        "the tokenizer it carries does not parse",
    ),
    (
        "export-bad-tokenizer",
        lambda d, c: ["export", f"--checkpoint={bad_tokenizer_checkpoint(d)}", f"--out={d / 'hf'}"],
        "the tokenizer it carries does not parse",
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
        "eval-no-tokenizer",
        lambda d, c: ["eval", f"--model={folder_without_tokenizer(d)}", "--tasks=shakespeare_milton_ppl"],
        "no tokenizer.json",
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
        "sa_switch-resumes-only-its-own-switch",
        lambda d, c: [
            "fit",
            f"--config={c}",
            "--model.config.sa_groups=dense",
            "--model.sa_switch.at_step=2",
            "--model.sa_switch.groups=every:2",
            f"--ckpt_path={sa_checkpoint(d)}",
        ],
        "model.config.sa_groups is [[0, 1], [2, 3]] there, [[0], [1], [2], [3]] here",
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
    config = tiny_run_config(tmp_path, small_corpus)
    code, _, err = run_cli(args(tmp_path, config), capsys)
    message = err[err.find("error:") :].strip()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert expected in message, err[-3000:]
    assert "\n\n" not in message  # one paragraph
    assert len(message.splitlines()) <= 2  # the paragraph and where the options are, no usage or tree
    assert not list(tmp_path.glob("*.png"))
    assert not list(tmp_path.glob("runs/**/version_*"))  # a refused fit leaves no run folder
