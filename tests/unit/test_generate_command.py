"""`python -m sa_train generate` in-process: streamed text equals the library's output; bad input is one
clear error."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer

from sa_train import SAConfig, SAModel
from sa_train.checkpoint import model_checkpoint
from sa_train.cli import main
from sa_train.data.tokenizer import EOS_TOKEN, train_bpe

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return train_bpe(datasets.Dataset.from_dict({"text": [TEXT]}), vocab_size=300).to_str()


def write_checkpoint(path: Path, tokenizer_json: str | None, max_seq_len: int = 32) -> SAModel:
    torch.manual_seed(0)
    config = SAConfig(
        vocab_size=300, d_model=64, n_layers=4, n_heads=4, max_seq_len=max_seq_len, sa_groups="every:2"
    )
    model = SAModel(SAConfig(**{**config.to_dict(), "init_std": 0.3})).eval()
    torch.save(model_checkpoint(model, tokenizer_json), path)
    return model


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_streams_the_prompt_and_the_models_continuation(tmp_path, tokenizer_json, capsys):
    model = write_checkpoint(tmp_path / "run.ckpt", tokenizer_json)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    prompt = "whether 'tis nobler"
    args = ["--checkpoint", str(tmp_path / "run.ckpt"), "--prompt", prompt, "--max-new-tokens", "12"]
    code, out, err = run(
        [*args, "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "3"], capsys
    )
    assert code == 0, err
    new = model.generate(
        [eos, *tokenizer.encode(prompt).ids],
        12,
        temperature=0.9,
        top_k=50,
        top_p=0.95,
        seed=3,
        eos_token_id=eos,
    )[0]
    assert out == prompt + tokenizer.decode(new) + "\n"
    assert len(new) > 3 and tokenizer.decode(new)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no checkpoint at"),
        ("foreign", "is not a sa_train checkpoint"),
        ("no-tokenizer", "holds no tokenizer"),
        ("long-prompt", "the prompt is"),
        ("top-p-0", "top_p=0.0 must lie in (0, 1]"),
        ("top-p-2", "top_p=2.0 must lie in (0, 1]"),
        ("no-room", "max_new_tokens=40 (--max-new-tokens) does not fit"),
        # Before: ignored without a word, and the text was the greedy one.
        ("top-k-greedy", "--top-k 5 only apply when sampling, and without --temperature decoding is greedy"),
        (
            "top-k-p-greedy",
            "add a temperature above 0, e.g. --temperature 0.8 --top-k 5 --top-p 0.9, or drop",
        ),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, tokenizer_json, capsys, case, expected):
    ckpt = tmp_path / "run.ckpt"
    write_checkpoint(ckpt, None if case == "no-tokenizer" else tokenizer_json)
    args = {"prompt": "To be", "max_new_tokens": "4"}
    if case == "missing":
        ckpt = tmp_path / "nowhere.ckpt"
    elif case == "foreign":
        torch.save({"weights": torch.zeros(3)}, ckpt)
    elif case == "long-prompt":
        args["prompt"] = TEXT
    elif case.startswith("top-p"):
        args.update(temperature="1.0", top_p="0" if case == "top-p-0" else "2")
    elif case == "no-room":
        args["max_new_tokens"] = "40"
    elif case.startswith("top-k"):
        args.update(top_k="5", **({"top_p": "0.9"} if case == "top-k-p-greedy" else {}))
    flags = [item for key, value in args.items() for item in (f"--{key.replace('_', '-')}", value)]
    code, out, err = run(["--checkpoint", str(ckpt), *flags], capsys)
    assert code == 2
    assert expected in err and err.startswith("error:"), err
    assert "Traceback" not in err and out == ""
