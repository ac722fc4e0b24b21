"""Issue 10 acceptance for Qwen3-VL through the real CLI, on a tiny random checkpoint.

The expected answer is the unmodified transformers model fed ``pixel_values_videos`` + ``video_grid_thw`` and
the processor's prompt (per-frame timestamp text), built by ``reference_generate`` of
tests/test_models_qwen3_vl.py from the very frames the CLI samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

pytestmark = pytest.mark.skipif(
    not hasattr(transformers, "Qwen3VLForConditionalGeneration"),
    reason=f"transformers {transformers.__version__} has no Qwen3-VL",
)

ROOT = Path(__file__).resolve().parent.parent
FRAMES, NEW = 8, 10
QUESTION = "what happens in the video?"


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    from holitom_cli.models.random_qwen import save_random_qwen

    return save_random_qwen(tmp_path_factory.mktemp("qwen3-cli") / "tiny", "qwen3_vl-tiny")


@pytest.fixture(scope="module")
def clip(make_video) -> Path:
    return make_video(frames=24, size=(160, 96), fps=12.0, pattern="moving")


def ask_json(model_dir: Path, video: Path, *extra: str) -> dict:
    env = {**os.environ, "HOLITOM_DEBUG": "1"}
    cmd = [sys.executable, "-m", "holitom_cli", "ask", str(video), QUESTION, "--model", str(model_dir)]
    cmd += ["--frames", str(FRAMES), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", str(NEW)]
    done = subprocess.run([*cmd, "--json", *extra], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def processor_prompt(adapter, pixels, video) -> torch.Tensor:
    """The prompt transformers' Qwen3VLProcessor writes for the sampled frames (its own replacement code:
    chat template, then per-temporal-patch timestamp text and ``<|video_pad|>`` tokens)."""
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    proc = object.__new__(Qwen3VLProcessor)
    proc.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    proc.tokenizer = adapter.tokenizer
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    meta = VideoMetadata(
        total_num_frames=video.meta.frame_count, fps=video.meta.fps, frames_indices=list(video.indices)
    )
    inputs = {"video_grid_thw": pixels.video_grid_thw, "video_metadata": [meta]}
    replacement = proc.replace_video_token(inputs, 0)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = adapter.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expanded, _ = proc.get_text_with_replacements([text], videos_replacements=[replacement])
    return torch.tensor([adapter.tokenizer(expanded[0], add_special_tokens=False)["input_ids"]])


@pytest.fixture(scope="module")
def reference_text(qwen3_dir, clip) -> str:
    from holitom_cli.models import qwen3_vl
    from holitom_cli.video import load_video

    video = load_video(clip, num_frames=FRAMES)
    adapter = qwen3_vl.load(qwen3_dir, device=torch.device("cpu"), dtype=torch.float32)
    pixels = adapter.preprocess(
        video.frames, list(video.timestamps), video_fps=video.meta.fps, total_frames=video.meta.frame_count
    )
    ids = processor_prompt(adapter, pixels, video)
    with torch.no_grad():
        out = adapter.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values_videos=pixels.pixel_values_videos,
            video_grid_thw=pixels.video_grid_thw,
            mm_token_type_ids=(ids == adapter.video_token_id).int() * 2,
            max_new_tokens=NEW,
            do_sample=False,
        )
    return adapter.tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


def test_no_compress_and_keep_all_give_the_unmodified_models_answer(qwen3_dir, clip, reference_text):
    assert ask_json(qwen3_dir, clip, "--no-compress")["answer"] == reference_text
    keep_all = ask_json(qwen3_dir, clip, "--retain-ratio", "1.0", "--tau", "1.0", "--no-inner")
    assert keep_all["answer"] == reference_text


def test_merging_reduces_the_tokens(qwen3_dir, clip):
    record = ask_json(qwen3_dir, clip)
    assert record["tokens"]["into_llm"] < record["tokens"]["input"]
    assert record["inner"]["visual_after"] < record["inner"]["visual_before"]
