"""GPU smoke suite: ``pytest -m gpu`` on a machine with a CUDA device (skipped, with the reason, without one).

Runs the paths a GPU user takes, in bf16 and fp16, on the tiny random checkpoint: the default compressed
answer (outer + inner stage), the same without compression against the unmodified transformers pixel path,
the inner stage's decode on the shortened cache, and ``--compare-baseline`` through the real CLI.
``benchmarks/gpu_check.sh`` runs this suite and the side-by-side benchmark at real shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# HOLITOM_GPU_TEST_DEVICE=cpu runs the same checks on the CPU (to check the suite itself where no GPU is).
DEVICE = os.environ.get("HOLITOM_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA device (torch.cuda.is_available() is False)",
    ),
]
DTYPES = ["bfloat16", "float16"]
QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module", params=DTYPES)
def gpu_pipe(request, tiny_model_dir):
    from holitom_cli.pipeline import Pipeline

    native_bf16 = DEVICE != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    if request.param == "bfloat16" and not native_bf16:
        pytest.skip("this GPU has no native bfloat16")
    return Pipeline.load(str(tiny_model_dir), device=DEVICE, dtype=request.param)


@pytest.fixture(scope="module")
def gpu_video(gpu_pipe, sample_video):
    from holitom_cli.pipeline import SamplingOptions

    return gpu_pipe.prepare_video(sample_video, SamplingOptions(frames=8))


def test_default_path_on_cuda(gpu_pipe, gpu_video) -> None:
    from holitom_cli.compression import get_preset
    from holitom_cli.pipeline import GenerationOptions

    assert gpu_pipe.model.device.type == torch.device(DEVICE).type
    answer = gpu_pipe.ask(gpu_video, QUESTION, get_preset("balanced"), GenerationOptions(max_new_tokens=8))
    stats = answer.stats.to_dict()
    tokens = stats["tokens"]
    assert tokens["into_llm"] < tokens["input"]
    inner = stats["inner"]
    assert inner["visual_after"] < inner["visual_before"]
    k = inner["layer"]
    lengths = inner["kv_lengths"]
    assert lengths is not None and all(n < lengths[0] for n in lengths[k:])
    assert answer.token_ids


def test_uncompressed_equals_the_transformers_pixel_path_on_cuda(gpu_pipe, gpu_video) -> None:
    from holitom_cli.pipeline import GenerationOptions

    model = gpu_pipe.model.model
    frames = gpu_video.clip.frames
    num_visual = frames.shape[0] * gpu_pipe.model.tokens_per_frame + 1
    ids, start = gpu_pipe.model.prompt_ids(QUESTION, num_visual)
    pixels = gpu_pipe.model.preprocess(frames).pixel_values[None]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values_videos=pixels,
            max_new_tokens=6,
            do_sample=False,
        )
    expected = out[0, ids.shape[1] :].tolist()
    ours = gpu_pipe.ask(gpu_video, QUESTION, None, GenerationOptions(max_new_tokens=6))
    assert ours.token_ids == expected[: len(ours.token_ids)]


def test_inner_stage_cached_decode_on_cuda(gpu_pipe) -> None:
    """Greedy decode on the merged cache equals re-running every step without a cache (same kept set)."""
    vlm = gpu_pipe.model
    num_visual = 12
    from holitom_cli.models.base import VisualSpan

    torch.manual_seed(0)
    embeds = torch.randn(num_visual, vlm.language_dims().hidden_size, device=DEVICE, dtype=vlm.dtype)
    where = torch.full((num_visual,), -1, device=DEVICE)
    span = VisualSpan(embeds, where, where, where)
    inputs = vlm.build_prompt(QUESTION, span)
    result = vlm.generate(inputs, span, max_new_tokens=4, inner_layer=2, inner_prune_ratio=0.5)
    stats = result.inner_stats
    assert stats.visual_after == 6 and stats.kv_lengths[-1] == stats.kv_lengths[0] - 6


def test_compare_baseline_cli_on_cuda(tiny_model_dir, sample_video) -> None:
    env = {**os.environ, "HOLITOM_DEBUG": "1"}
    cmd = [sys.executable, "-m", "holitom_cli", "ask", str(sample_video), QUESTION]
    cmd += ["--model", str(tiny_model_dir), "--device", DEVICE, "--frames", "8", "--max-new-tokens", "8"]
    cmd += ["--compare-baseline", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["baseline"]["tokens"]["into_llm"] > record["tokens"]["into_llm"]
    assert record["speedup"]
