"""Library noise is dropped at its source logger; other messages of the same libraries still get through."""

from __future__ import annotations

import logging

import pytest

import holitom_cli.models  # noqa: F401  (importing the package installs the filters)
from holitom_cli.models.noise import NOISE


@pytest.mark.parametrize(("name", "prefix"), [(name, prefix) for name, prefix, _ in NOISE])
def test_known_noise_is_dropped_and_real_warnings_pass(caplog, name, prefix) -> None:
    logger = logging.getLogger(name)
    with caplog.at_level(logging.INFO):
        logger.warning(prefix + " from %s to %s", "a", "b")
        logger.warning("a real problem: %s", "disk on fire")
    messages = [r.getMessage() for r in caplog.records if r.name == name]
    assert messages == ["a real problem: disk on fire"]


def test_int8_answer_on_cpu_logs_no_per_call_lines(caplog, tiny_model_dir) -> None:
    """A real 8-bit model answering on CPU: before the filter, bitsandbytes logged a line per int8 matmul."""
    pytest.importorskip("bitsandbytes", reason="the 'quant' extra (bitsandbytes) is not installed")
    import torch

    from holitom_cli.models import load_model

    vlm = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16", quantize="8bit")
    from holitom_cli.models.base import VisualSpan

    embeds = torch.randn(3, vlm.language_dims().hidden_size)
    where = torch.full((3,), -1)
    span = VisualSpan(embeds, where, where, where)
    inputs = vlm.build_prompt("what happens?", span)
    with caplog.at_level(logging.DEBUG):
        result = vlm.generate(inputs, span, max_new_tokens=4)
    assert result.prompt_tokens == inputs.input_ids.shape[1]
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]


def test_a_long_question_prints_no_tokenizer_length_warning(caplog, tiny_model_dir) -> None:
    """transformers warns on stderr when a text is longer than the tokenizer's model_max_length; holitom's own
    context check says what to do instead, so the warning is dropped (the review of issue 11 saw it leak)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.model_max_length = 16
    ids = tokenizer("what happens in the video " * 20)["input_ids"]
    assert len(ids) > 16
    assert not [r for r in caplog.records if "Token indices sequence length" in r.getMessage()]
