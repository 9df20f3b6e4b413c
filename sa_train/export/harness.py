"""lm-evaluation-harness's ``hf`` model for sa_train exports, registered with lm-eval as ``sa_train_export``.

The export's tokenizer puts the end-of-text token in front of every text (sa_train's prompt convention,
:mod:`sa_train.text`), so a multiple-choice context is scored as the start of a document, as ``generate``
continues it. lm-eval's rolling perplexity puts the same token in front of the passage itself, and with the
tokenizer's it was there twice: the passage was scored after two, and the second was scored as text. Here
rolling requests are encoded without the tokenizer's token; every other request keeps it.

lm-eval also scores a rolling request's windows batch by batch, each with a progress bar of its own (one
bar per document of a perplexity task, 27 for `--limit 3` of the shipped one), and encodes whole passages
past the tokenizer's ``model_max_length`` before it cuts them into windows, which made transformers warn
that the sequence is too long for the model. Here the task's one bar stays and the windows' bars and the
warning go.
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

EXPORT_MODEL = "sa_train_export"


@register_model(EXPORT_MODEL)
class ExportLM(HFLM):
    _rolling = False

    def loglikelihood_rolling(self, *args: Any, **kwargs: Any) -> Any:
        tokenizer_bos, self.add_bos_token = self.add_bos_token, False
        context_len, self.tokenizer.model_max_length = self.tokenizer.model_max_length, sys.maxsize
        self._rolling = True
        try:
            return super().loglikelihood_rolling(*args, **kwargs)
        finally:
            self.add_bos_token, self.tokenizer.model_max_length = tokenizer_bos, context_len
            self._rolling = False

    def _loglikelihood_tokens(self, *args: Any, disable_tqdm: bool = False, **kwargs: Any) -> Any:
        return super()._loglikelihood_tokens(*args, disable_tqdm=disable_tqdm or self._rolling, **kwargs)
