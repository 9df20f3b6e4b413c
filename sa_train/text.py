"""Text in, text out: a trained model with its run's tokenizer, and the one prompt convention.

Training reads one token stream in which every document is followed by ``<|endoftext|>``, so a document
starts right after that token. A prompt is therefore always encoded as ``[<|endoftext|>, *text tokens]``,
and the model continues it as the start of a fresh document. :meth:`TextModel.encode` is that rule; the
``generate`` command goes through it, the export's tokenizer adds the same token as its bos token
(:func:`sa_train.export.writer.hf_tokenizer`), and lm-eval reads the export's tokenizer, so a prompt is the
same token ids in each of them (``tests/integration/test_prompt_convention.py``).

>>> lm = TextModel.from_checkpoint("runs/sa-tiny/version_0/checkpoints/last.ckpt")
>>> lm.generate("To be, or not", max_new_tokens=32)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, overload

import torch

from sa_train.checkpoint import read_checkpoint
from sa_train.generation import Sampling, stream
from sa_train.model import SAModel

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@dataclass
class TextModel:
    """A model, the tokenizer it was trained with, and that tokenizer's end-of-text id."""

    model: SAModel
    tokenizer: Tokenizer
    eos_token_id: int

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> TextModel:
        """The model and tokenizer of a checkpoint written by ``fit`` (or ``convert``), in eval mode."""
        saved = read_checkpoint(path)
        tokenizer = saved.tokenizer("turn text into token ids and back")
        return cls(SAModel.from_saved(saved).to(device), tokenizer, saved.eos_token_id(tokenizer))

    def encode(self, text: str) -> list[int]:
        """The token ids of a prompt: the end-of-text token, then the text's tokens."""
        return [self.eos_token_id, *self.tokenizer.encode(text).ids]

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        compile: bool = False,
    ) -> Iterator[str]:
        """The continuation of ``prompt`` as it is decoded, piece by piece (a piece can be empty while a
        multi-byte character is incomplete); ends at the end-of-text token or after ``max_new_tokens``.
        The prompt's length is checked before the first piece is asked for."""
        from tokenizers.decoders import DecodeStream

        prompts, sampling = [self.encode(prompt)], sampling or Sampling()
        steps = stream(self.model, prompts, max_new_tokens, sampling, self.eos_token_id, compile)
        first = next(steps)  # checks the prompt and prefills on the call, not on the first piece

        def pieces() -> Iterator[str]:
            decoder, generated, emitted = DecodeStream(skip_special_tokens=True), [], 0
            for tokens in (first, *steps):
                generated.append(int(tokens[0]))
                piece = decoder.step(self.tokenizer, generated[-1]) or ""
                emitted += len(piece)
                yield piece
            # The stream holds back a trailing partial character; the full decode renders it.
            yield self.tokenizer.decode(generated)[emitted:]

        return pieces()

    @overload
    def generate(
        self, prompts: str, max_new_tokens: int = ..., sampling: Sampling | None = ..., compile: bool = ...
    ) -> str: ...
    @overload
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = ...,
        sampling: Sampling | None = ...,
        compile: bool = ...,
    ) -> list[str]: ...
    def generate(self, prompts, max_new_tokens=64, sampling=None, compile=False):
        """The continuation of one prompt (a str), or of each of several (a list, decoded as one batch).
        Greedy unless ``sampling`` says otherwise; a continuation ends before its end-of-text token."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        outputs = self.model.generate(
            [self.encode(text) for text in texts],
            max_new_tokens,
            **vars(sampling or Sampling()),
            eos_token_id=self.eos_token_id,
            compile=compile,
        )
        decoded = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs]
        return decoded[0] if isinstance(prompts, str) else decoded
