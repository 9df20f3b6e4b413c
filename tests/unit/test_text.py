"""One prompt convention (:mod:`sa_train.text`): ``generate``, :class:`TextModel`, the export's tokenizer
with transformers' ``generate``, and lm-eval on the export encode a prompt as the same token ids, and
continue or score it alike."""

from __future__ import annotations

import pytest
import torch
import transformers
from lm_eval.api.instance import Instance
from test_export import tiny_model, write_checkpoint

from sa_train import TextModel
from sa_train.cli import main
from sa_train.errors import CheckpointError
from sa_train.export.harness import ExportLM
from sa_train.export.writer import export_checkpoint
from sa_train.generation import Sampling

PROMPT = "To be, or not to be, that is"


def test_a_prompt_is_the_same_ids_and_continuation_in_cli_api_export_and_lm_eval(
    tmp_path, tokenizer_json, capsys
):
    model = tiny_model("sa-groups-of-2-gqa")
    checkpoint = write_checkpoint(tmp_path / "m.ckpt", model, tokenizer_json)
    lm = TextModel.from_checkpoint(checkpoint)
    ids = lm.encode(PROMPT)
    assert ids == [lm.eos_token_id, *lm.tokenizer.encode(PROMPT).ids]
    text = lm.generate(PROMPT, max_new_tokens=12)
    assert lm.generate([PROMPT, "O"], max_new_tokens=12)[0] == text
    assert "".join(lm.stream(PROMPT, max_new_tokens=12)) == text

    assert (
        main(["generate", "--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "12"]) == 0
    )
    assert capsys.readouterr().out == PROMPT + text + "\n"

    out = export_checkpoint(checkpoint, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer(PROMPT).input_ids == ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    generated = hf.generate(**hf_tokenizer(PROMPT, return_tensors="pt"), max_new_tokens=12, do_sample=False)
    assert hf_tokenizer.decode(generated[0, len(ids) :], skip_special_tokens=True) == text

    # lm-eval scores a continuation after the same ids (its rolling perplexity: test_export_end_to_end).
    harness = ExportLM(pretrained=str(out), trust_remote_code=True, batch_size=1, device="cpu")
    request = Instance("loglikelihood", doc={}, arguments=(PROMPT, " the"), idx=0)
    ((logprob, _),) = harness.loglikelihood([request])
    continuation = lm.tokenizer.encode(" the").ids
    with torch.no_grad():
        logprobs = model(torch.tensor([ids + continuation[:-1]]))[0, len(ids) - 1 :].log_softmax(-1)
    want = logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
    assert logprob == pytest.approx(want, rel=1e-5)


def test_text_model_samples_repeatably_and_refuses_a_checkpoint_without_tokenizer(tmp_path, tokenizer_json):
    model = tiny_model("dense-gqa")
    lm = TextModel.from_checkpoint(write_checkpoint(tmp_path / "m.ckpt", model, tokenizer_json))
    sampling = Sampling(temperature=1.0, top_k=20, seed=3)
    assert lm.generate(PROMPT, 10, sampling) == lm.generate(PROMPT, 10, sampling)
    with pytest.raises(CheckpointError, match="holds no tokenizer, and one is needed to turn text"):
        TextModel.from_checkpoint(write_checkpoint(tmp_path / "bare.ckpt", model, None))
