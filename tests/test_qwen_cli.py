"""Issue 10: every command works for Qwen2.5-VL without special cases, on a tiny random checkpoint.

The acceptance commands run as real CLI processes; the expected answers come from the unmodified
transformers model fed ``pixel_values_videos`` + ``video_grid_thw`` (+ ``second_per_grid_ts`` computed here
as qwen-vl-utils does, and ``mm_token_type_ids`` as the processor builds them). The merge-map picture is read
back pixel by pixel against the token grid transformers' own ``smart_resize`` gives the video.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from typer.testing import CliRunner

from holitom_cli import render
from holitom_cli.cli.app import app
from holitom_cli.models.random_qwen import save_random_qwen
from holitom_cli.video import load_video

ROOT = Path(__file__).resolve().parent.parent
FRAMES, NEW = 8, 10
QUESTION = "What is moving in the video?"
runner = CliRunner()


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return save_random_qwen(tmp_path_factory.mktemp("qwen-cli") / "tiny", "qwen2_5_vl-tiny")


@pytest.fixture(scope="module")
def clip(make_video) -> Path:
    return make_video(frames=24, size=(160, 96), fps=12.0, pattern="moving")


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    """``python -m holitom_cli ...`` in a fresh process."""
    env = {**os.environ, "HOLITOM_DEBUG": "1"}
    cmd = [sys.executable, "-m", "holitom_cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def ask_json(model_dir: Path, video: Path, *extra: str) -> dict:
    done = cli("ask", video, QUESTION, "--model", model_dir, "--frames", FRAMES, "--device", "cpu",
               "--dtype", "float32", "--max-new-tokens", NEW, "--json", *extra)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def expected_grid(qwen_dir: Path, height: int, width: int) -> tuple[int, int]:
    """Token grid (rows, cols) by transformers' smart_resize with the checkpoint's pixel budget."""
    spec = json.loads((qwen_dir / "video_preprocessor_config.json").read_text())
    size = spec["size"]
    h, w = hf_smart_resize(
        height, width, factor=28, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"]
    )
    return h // 28, w // 28


@pytest.fixture(scope="module")
def reference(qwen_dir, clip) -> dict:
    """The unmodified model's greedy answer on the pixel path, for the frames the CLI samples."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from holitom_cli.models.qwen_preprocess import QwenVideoPreprocessing

    video = load_video(clip, num_frames=FRAMES)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(qwen_dir))
    pre = QwenVideoPreprocessing.from_checkpoint(qwen_dir, model.config.vision_config)
    pixels = pre(video.frames, list(video.timestamps))
    # qwen-vl-utils: sample_fps = frames / total_frames * video_fps; 2 frames per temporal patch
    sample_fps = FRAMES / video.meta.frame_count * video.meta.fps
    seconds = 2 / sample_fps
    grid = pixels.video_grid_thw
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|video_pad|>", "<|video_pad|>" * (int(grid.prod()) // 4))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values_videos=pixels.pixel_values_videos,
            video_grid_thw=grid,
            second_per_grid_ts=torch.tensor([seconds]),
            mm_token_type_ids=(ids == model.config.video_token_id).int() * 2,
            max_new_tokens=NEW,
            do_sample=False,
        )
    new = out[0, ids.shape[1] :].tolist()
    assert len(set(new)) > 3  # a non-trivial answer, so equality means something
    return {"text": tok.decode(new, skip_special_tokens=True), "prompt_tokens": ids.shape[1], "grid": grid}


@pytest.fixture(scope="module")
def uncompressed(qwen_dir, clip) -> dict:
    return ask_json(qwen_dir, clip, "--no-compress")


@pytest.mark.slow
def test_no_compress_gives_the_unmodified_models_answer(uncompressed, reference, qwen_dir, clip):
    record = uncompressed
    assert record["answer"] == reference["text"]
    assert record["model"]["family"] == "qwen2_5_vl" and record["config"] is None
    t, h, w = (int(v) for v in reference["grid"][0])
    rows, cols = expected_grid(qwen_dir, 96, 160)
    assert (h // 2, w // 2) == (rows, cols) and rows != cols  # a non-square grid
    units, per_unit = FRAMES // 2, rows * cols
    assert record["video"]["temporal_units"] == t == units and record["video"]["frames_per_unit"] == 2
    assert record["video"]["tokens_per_unit"] == per_unit and record["video"]["grid"] == [rows, cols]
    tokens = record["tokens"]
    assert tokens == {"input": units * per_unit, "after_temporal": units * per_unit,
                      "into_llm": units * per_unit, "after_inner": units * per_unit}  # fmt: skip
    assert record["prompt_tokens"] == reference["prompt_tokens"]
    assert record["flops"]["ratio"] == 1.0 and record["flops"]["vision"] > 0


@pytest.mark.slow
def test_keep_everything_gives_the_unmodified_models_answer(reference, qwen_dir, clip):
    record = ask_json(qwen_dir, clip, "--retain-ratio", "1.0", "--tau", "1.0", "--no-inner")
    assert record["answer"] == reference["text"]
    assert record["tokens"]["into_llm"] == record["tokens"]["input"] and record["inner"] is None


@pytest.mark.slow
def test_merging_and_compare_baseline(uncompressed, qwen_dir, clip):
    record = ask_json(qwen_dir, clip, "--compare-baseline", "--repeats", "1")
    tokens = record["tokens"]
    assert tokens["into_llm"] < tokens["input"] and tokens["after_inner"] < tokens["into_llm"]
    assert record["inner"]["layer"] is not None and record["inner"]["num_layers"] == 4
    assert record["flops"]["holitom"] < record["flops"]["baseline"]
    assert record["flops"]["paper_formula"]["ratio"] < 1
    # the baseline of the comparison is the full model: the same answer as --no-compress
    assert record["baseline"]["answer"] == uncompressed["answer"]
    assert record["baseline"]["tokens"]["into_llm"] == tokens["input"]
    assert record["speedup"]["repeats"] == 1


def _keys(value, prefix=""):
    """Every key path of a JSON value (list items: their first element's keys; kv_lengths: not walked)."""
    if isinstance(value, dict):
        out = set()
        for key, item in value.items():
            out |= {f"{prefix}{key}"} | _keys(item, f"{prefix}{key}.")
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _keys(value[0], f"{prefix}[].")
    return set()


@pytest.mark.slow
def test_json_schema_is_the_same_for_both_families(uncompressed, tiny_model_dir, clip):
    llava = runner.invoke(app, ["ask", str(clip), QUESTION, "-m", str(tiny_model_dir), "--frames", "4",
                                "--max-new-tokens", "3", "--no-compress", "--json"])  # fmt: skip
    assert llava.exit_code == 0, llava.stderr
    record = json.loads(llava.stdout)
    assert record["model"]["family"] == "llava_onevision"
    assert _keys(record) == _keys(uncompressed)
    assert record["video"]["frames_per_unit"] == 1 and record["video"]["grid"] == [7, 7]
    # LLaVA-OneVision's newline is the one suffix token: into_llm = T N + 1
    assert record["tokens"]["into_llm"] == record["tokens"]["input"] + 1 == 4 * 49 + 1


def _kept_runs(line: np.ndarray) -> int:
    """Runs of the kept-outline colour along a line of pixels."""
    hit = np.all(line == np.array(render.KEPT_COLOUR), axis=-1)
    return int(hit[0]) + int(np.sum(hit[1:] & ~hit[:-1]))


@pytest.mark.slow
def test_inspect_draws_the_non_square_grid(qwen_dir, clip, tmp_path):
    out = tmp_path / "map.png"
    result = runner.invoke(app, ["inspect", str(clip), "-o", str(out), "-m", str(qwen_dir), "--frames",
                                 str(FRAMES), "--dtype", "float32", "--no-compress", "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    rows, cols = expected_grid(qwen_dir, 96, 160)
    img = np.asarray(Image.open(out).convert("RGB"))
    x0, y0 = render.MARGIN, render.MARGIN + render.HEADER_H  # the first tile's top-left corner
    assert tuple(img[y0, x0]) == render.KEPT_COLOUR  # compression off: every cell is outlined as kept
    width = int(np.argmin(np.all(img[y0, x0:] == render.KEPT_COLOUR, axis=-1)))  # top outline of row 0
    height = int(np.argmin(np.all(img[y0:, x0] == render.KEPT_COLOUR, axis=-1)))  # left outline of col 0
    assert width * rows == height * cols  # the tile has the grid's shape (cells are square)
    cell = width // cols
    for r in range(rows):  # through the middle of every row of cells: cols cells -> cols + 1 outline runs
        assert _kept_runs(img[y0 + r * cell + cell // 2, x0 : x0 + width + 1]) == cols + 1
    for c in range(cols):
        assert _kept_runs(img[y0 : y0 + height + 1, x0 + c * cell + cell // 2]) == rows + 1
    # one tile per temporal unit (FRAMES / 2), each the same size, side by side
    tops = np.all(img[y0, :] == render.KEPT_COLOUR, axis=-1)
    starts = np.flatnonzero(tops[1:] & ~tops[:-1]) + 1
    assert len(starts) + int(tops[0]) == FRAMES // 2


@pytest.mark.slow
def test_inspect_with_merging_and_explain(qwen_dir, clip, tmp_path):
    out = tmp_path / "merged.png"
    result = runner.invoke(app, ["inspect", str(clip), "-o", str(out), "-m", str(qwen_dir), "--frames",
                                 str(FRAMES), "--dtype", "float32"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "temporal units of 2 frames" in result.stderr
    assert Image.open(out).size[0] >= render.MIN_WIDTH


@pytest.mark.slow
def test_batch_on_qwen(qwen_dir, clip, tmp_path):
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["batch", str(clip), "-q", QUESTION, "-q", "Describe it.", "-o", str(out),
                                 "-m", str(qwen_dir), "--frames", "4", "--max-new-tokens", "3",
                                 "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(r["error"] is None for r in records)
    assert all(r["model"]["family"] == "qwen2_5_vl" for r in records)
    assert all(r["tokens"]["into_llm"] < r["tokens"]["input"] for r in records)


def test_models_lists_every_family_with_its_checkpoints():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"llava_onevision", "qwen2_5_vl"} <= set(data["families"])
    details = {d["family"]: d for d in data["family_details"]}
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in details["qwen2_5_vl"]["checkpoints"]
    assert "llava-hf/llava-onevision-qwen2-7b-ov-hf" in details["llava_onevision"]["checkpoints"]
    assert details["qwen2_5_vl"]["name"] == "Qwen2.5-VL"
    table = runner.invoke(app, ["models"])
    assert table.exit_code == 0 and "qwen2_5_vl" in table.stdout and "Qwen2.5-VL" in table.stdout


def test_quantization_skips_the_adapters_modules():
    pytest.importorskip("transformers")
    from holitom_cli.models import llava_onevision, qwen2_5_vl
    from holitom_cli.models.loading import quantization_config

    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        pytest.skip(f"bitsandbytes cannot be imported: {exc}")
    for module in (llava_onevision, qwen2_5_vl):
        cfg = quantization_config("8bit", torch.float32, module.QUANTIZATION_SKIP)
        assert cfg.llm_int8_skip_modules == list(module.QUANTIZATION_SKIP)
    assert qwen2_5_vl.QUANTIZATION_SKIP == ("model.visual", "lm_head")


@pytest.mark.slow
def test_quantized_qwen_language_model(qwen_dir, clip):
    bnb = pytest.importorskip("bitsandbytes")
    from holitom_cli.pipeline import GenerationOptions, Pipeline, SamplingOptions

    pipe = Pipeline.load(str(qwen_dir), dtype="float32", quantize="8bit")
    model = pipe.model.model
    lm = [m for n, m in model.named_modules()
          if n.startswith("model.language_model.layers") and isinstance(m, torch.nn.Linear)]  # fmt: skip
    assert lm and all(isinstance(m, bnb.nn.Linear8bitLt) for m in lm)
    for name, module in model.named_modules():
        if name.startswith("model.visual") or name == "lm_head":
            assert not isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit), name
    video = pipe.prepare_video(clip, SamplingOptions(frames=4))
    answer = pipe.ask(video, QUESTION, None, GenerationOptions(max_new_tokens=3))
    assert answer.stats.new_tokens == 3 and answer.stats.model["quantize"] == "8bit"
