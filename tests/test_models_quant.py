"""bitsandbytes quantization of the language model only (CPU 8-bit and 4-bit work, bitsandbytes >= 0.45)."""

from __future__ import annotations

import pytest
import torch

from holitom_cli.pipeline import GenerationOptions, Pipeline, SamplingOptions

try:
    import bitsandbytes as bnb
except Exception as exc:  # not installed, or its native library does not load here
    bnb = None
    _REASON = f"bitsandbytes cannot be imported: {exc}"
else:
    _REASON = ""


@pytest.mark.skipif(bnb is None, reason=_REASON or "bitsandbytes missing")
@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_quantized_language_model(tiny_model_dir, sample_video, quantize):
    pipe = Pipeline.load(str(tiny_model_dir), dtype="float32", quantize=quantize)
    model = pipe.model.model
    expected = bnb.nn.Linear8bitLt if quantize == "8bit" else bnb.nn.Linear4bit
    lm_linears = [
        m
        for n, m in model.named_modules()
        if n.startswith("model.language_model.layers") and isinstance(m, torch.nn.Linear)
    ]
    assert lm_linears and all(isinstance(m, expected) for m in lm_linears)
    # vision tower, projector and lm_head stay plain float layers
    for name, module in model.named_modules():
        if name.startswith(("model.vision_tower", "model.multi_modal_projector")) or name == "lm_head":
            assert not isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit), name
    assert model.lm_head.weight.dtype == torch.float32
    assert pipe.model.describe()["quantize"] == quantize

    video = pipe.prepare_video(sample_video, SamplingOptions(frames=4))
    answer = pipe.ask(video, "What is moving?", None, GenerationOptions(max_new_tokens=3))
    assert answer.stats.new_tokens == 3
