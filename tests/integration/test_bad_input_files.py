"""The table of bad files and folders: unreadable, foreign or mismatched checkpoints, plain files where
a folder must be made, run folders without training, Hugging Face folders, data files and tokenizers that
cannot be used. Each case ends in one paragraph naming the problem and the fix, exit status 2, no
traceback. Add a row when a new kind of bad file is handled.

Bad options and config values are test_bad_input_options' table; it imports its checks
(assert_one_paragraph_and_exit_2) and the file makers it shares (checkpoint_with_tokenizer, convert_args)
from here."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
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
        "eval-no-tokenizer",
        lambda d, c: ["eval", f"--model={folder_without_tokenizer(d)}", "--tasks=shakespeare_milton_ppl"],
        "no tokenizer.json",
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
]


def assert_one_paragraph_and_exit_2(tmp_path, small_corpus, capsys, args, expected) -> None:
    """The checks of a row of either table: the command run in this process on the tiny run config."""
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


@pytest.mark.parametrize("args, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_paragraph_and_exit_2(tmp_path, small_corpus, capsys, args, expected):
    assert_one_paragraph_and_exit_2(tmp_path, small_corpus, capsys, args, expected)
