"""Tool commands of ``python -m sa_train``: one small module, one plain function each."""

from __future__ import annotations

import argparse


def tool_parser(command: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of ``python -m sa_train <command>``: options must be spelt in full, as for the trainer
    commands (argparse would read ``--max-new 8`` as ``--max-new-tokens 8`` without a word)."""
    return argparse.ArgumentParser(
        prog=f"python -m sa_train {command}", description=description, allow_abbrev=False
    )
