"""Tool commands of ``python -m sa_train``: one small module, one plain function each."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import NoReturn


class ToolParser(argparse.ArgumentParser):
    """A tool command's parser: a parse error is one line and where the options are, as for the trainer
    commands, not argparse's usage dump (6 to 9 lines) above it."""

    def error(self, message: str) -> NoReturn:
        hint = suggestions(message, self)
        sys.stderr.write(f"error: {message}{hint}\nRun `{self.prog} --help` for the accepted options.\n")
        self.exit(2)


def tool_parser(command: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of ``python -m sa_train <command>``: options must be spelt in full, as for the trainer
    commands (argparse would read ``--max-new 8`` as ``--max-new-tokens 8`` without a word)."""
    return ToolParser(prog=f"python -m sa_train {command}", description=description, allow_abbrev=False)


def suggestions(message: str, parser: argparse.ArgumentParser) -> str:
    """' Did you mean --x?' for each unrecognised option close to a real one (typos, abbreviations)."""
    if not message.startswith("unrecognized arguments"):
        return ""
    known = [name for name in parser._option_string_actions if name.startswith("--")]
    hints = []
    for word in message.split(":", 1)[1].split():
        if word.startswith("--"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.8)
            hints += [f"{close[0]} (not {word.split('=', 1)[0]})"] if close else []
    return f". Did you mean {', '.join(hints)}?" if hints else ""
