"""What the tool commands print about themselves: help without docstring markup and with defaults, and
bench's machine line."""

from __future__ import annotations

import pytest
import torch

from sa_train.cli import main
from sa_train.measure import machine
from sa_train.tools.bench import format_report


@pytest.mark.parametrize(
    "command, defaults",
    [
        (
            "analyze",
            ["(default: text)", "(default: 2)", "(default: 4)", "(default: js)", "(default: matched)"],
        ),
        ("convert", ["(default: text)", "(default: 4096)", "(default: the works the default split"]),
    ],
)
def test_help_is_plain_text_with_defaults(command, defaults, capsys):
    """Before: the description was the module docstring's reStructuredText (``...``, :mod:`...`), and
    --threshold, --pairing and --data gave no default."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "``" not in text and ":mod:" not in text
    for default in defaults:
        assert default in text, default
    if command == "analyze":
        assert "(default: 0.8)" in text


def test_bench_prints_its_machine_as_a_line_not_a_dict():
    info = machine(torch.device("cpu"))
    line = format_report({"machine": info}).splitlines()[0]
    assert line == f"machine: cpu ({info['cpu']}), {info['threads']} threads, torch {torch.__version__}"
    gpu = {**info, "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}
    assert format_report({"machine": gpu}).startswith("machine: cuda (NVIDIA H100 80GB HBM3), ")
