"""lm-evaluation-harness's ``hf`` model for sa_train exports, registered with lm-eval as ``sa_train_export``.

The export's tokenizer puts the end-of-text token in front of every text (sa_train's prompt convention,
:mod:`sa_train.text`), so a multiple-choice context is scored as the start of a document, as ``generate``
continues it. lm-eval's rolling perplexity puts the same token in front of the passage itself, and with the
tokenizer's it was there twice: the passage was scored after two, and the second was scored as text. Here
rolling requests are encoded without the tokenizer's token; every other request keeps it.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

EXPORT_MODEL = "sa_train_export"


@register_model(EXPORT_MODEL)
class ExportLM(HFLM):
    def loglikelihood_rolling(self, *args: Any, **kwargs: Any) -> Any:
        tokenizer_bos, self.add_bos_token = self.add_bos_token, False
        try:
            return super().loglikelihood_rolling(*args, **kwargs)
        finally:
            self.add_bos_token = tokenizer_bos
