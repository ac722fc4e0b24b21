"""Smoke tests of the benchmark scripts' pure parts (the benchmarks themselves are run by hand).

- the paper-table script reproduces the paper's FLOPs numbers with the paper's formula;
- the prefill-curve fit recovers known coefficients and combines layers as K t(n) + (L-K) t(n');
- the synthetic features have the temporal structure they claim (cuts, moving object, slow drift);
- the Pillow chart draws bars whose lengths follow the data;
- the end-to-end script runs on the tiny random model (2 frames, 1 repeat) and writes its outputs, and on
  the tiny Qwen2.5-VL / Qwen3-VL shapes it builds itself (``--shape``), through the ordinary loader;
- the DPC-KNN agreement script compares both distance paths on a short video and finds no difference.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import paper_table  # noqa: E402
from benchmarks.chart import STAGES, Panel, draw_ttft_chart  # noqa: E402
from benchmarks.prefill_model import LayerCurve  # noqa: E402
from benchmarks.synthetic import adjacent_similarity, synthetic_features  # noqa: E402


# ------------------------------------------------------------------------------------------ paper table
def _paper_formula(n: float, d: int, m: int) -> float:
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


@pytest.mark.parametrize("model", ["7b", "72b"])
def test_paper_table_matches_the_papers_numbers(model: str) -> None:
    rows = paper_table.table_rows(model)
    reported = paper_table.PAPER_TFLOPS[model]
    checked = 0
    for row in rows:
        if row["paper_tflops"] is not None:
            assert round(row["formula_tflops"], 1) == pytest.approx(reported[row["setting"]], abs=1e-9)
            checked += 1
    assert checked == len(reported)


def test_paper_table_token_counts_and_exact_count() -> None:
    rows = {r["setting"]: r for r in paper_table.table_rows("7b", frames=32, text_tokens=40)}
    # the paper's visual-token count: T * ceil(196 r)
    assert rows["baseline"]["visual_tokens"] == 6272
    assert [rows[f"{p}/M"]["visual_tokens"] for p in ("fastest", "fast", "balanced", "accurate")] == [
        640,
        960,
        1280,
        1568,
    ]
    # independent exact count of the baseline: 28 Qwen2-7B layers on 40 + 6272 + 1 tokens, causal
    d, f, h, kv, hd, vocab, n = 3584, 18944, 28, 4, 128, 152128, 6313
    per_layer = 2 * n * d * (2 * h * hd + 2 * kv * hd) + 2 * 2 * hd * h * n * (n + 1) // 2 + 2 * 3 * n * d * f
    assert rows["baseline"]["exact_tflops"] * 1e12 == pytest.approx(28 * per_layer + 2 * d * vocab, rel=1e-12)
    # inner stage at K = 18 on 641 visual tokens (newline included): 320 kept, 321 removed
    short = 40 + 320
    exact_m = rows["fastest/M"]["exact_tflops"] * 1e12

    def layer(k: int) -> int:
        return 2 * k * d * (2 * h * hd + 2 * kv * hd) + 2 * 2 * hd * h * k * (k + 1) // 2 + 6 * k * d * f

    assert exact_m == pytest.approx(18 * layer(681) + 10 * layer(short) + 2 * d * vocab, rel=1e-12)
    assert rows["fastest/M"]["formula_tflops"] * 1e12 == pytest.approx(
        18 * _paper_formula(640, d, f) + 10 * _paper_formula(320, d, f)
    )


def test_paper_table_main_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paper_table.main(["--out", str(tmp_path)])
    data = json.loads((tmp_path / "paper_table.json").read_text())
    assert {m: len(r) for m, r in data["rows"].items()} == {"7b": 9, "72b": 9}
    md = (tmp_path / "paper_table.md").read_text()
    assert "LLaVA-OV-72B" in md and "429.3" in md
    assert "6.9" in capsys.readouterr().out  # 2.8 / 40.8 at `fastest` with the inner stage


# ------------------------------------------------------------------------------------------ prefill fit
def test_layer_curve_recovers_a_quadratic_and_combines_layers() -> None:
    a, b, c = 0.01, 2e-5, 3e-9
    curve = LayerCurve(shape="x", num_layers=24)
    curve.points = {n: a + b * n + c * n * n for n in (256, 1024, 2048, 4096)}
    curve.fit()
    assert curve.coef == pytest.approx((a, b, c), rel=1e-6)
    t = lambda n: a + b * n + c * n * n  # noqa: E731
    assert curve.prefill_s(6000) == pytest.approx(24 * t(6000), rel=1e-6)
    assert curve.prefill_s(700, inner_layer=15, tokens_after=350) == pytest.approx(15 * t(700) + 9 * t(350))
    assert curve.extrapolated(8000) and not curve.extrapolated(3000)


def test_layer_curve_clamps_negative_curvature() -> None:
    curve = LayerCurve(shape="x", num_layers=2)
    curve.points = {100: 1.0, 200: 2.1, 300: 2.9, 400: 3.6}  # concave noise
    curve.fit()
    assert curve.coef[2] == 0.0
    assert curve.layer_s(10_000) > curve.layer_s(400)


# ------------------------------------------------------------------------------------------ synthetic data
def test_synthetic_features_have_cuts_motion_and_drift() -> None:
    feats, scores, cuts = synthetic_features(40, 196, 64, seed=3, mean_scene=8, dtype=torch.float32)
    assert feats.shape == (40, 196, 64) and scores.shape == (40, 196)
    assert torch.allclose(scores.sum(-1), torch.ones(40))
    assert cuts[0] == 0 and len(cuts) >= 2
    sim = adjacent_similarity(feats)  # (39, 196), computed here with plain cosine
    ref = torch.nn.functional.cosine_similarity(feats[1:], feats[:-1], dim=-1)
    assert torch.allclose(sim, ref, atol=1e-5)
    for cut in cuts[1:]:
        assert sim[cut - 1].abs().mean() < 0.3  # a new scene: unrelated vectors
    inside = [t for t in range(39) if t + 1 not in cuts]
    # within scenes most positions are similar, the 9 moving-object cells are not
    assert (sim[inside] > 0.6).float().mean() > 0.85
    assert ((sim[inside] < 0.3).sum(-1) >= 9).all()


# ------------------------------------------------------------------------------------------ chart
def test_chart_bar_lengths_follow_the_data(tmp_path: Path) -> None:
    from PIL import Image

    panels = [Panel("p", [("a", {"vision": 2.0, "prefill": 2.0}), ("b", {"vision": 2.0, "prefill": 0.5})])]
    path = draw_ttft_chart(panels, tmp_path / "c.png")
    img = Image.open(path).convert("RGB")
    red = STAGES["prefill"][1]
    widths = []
    for y in range(65, img.height):  # below the title and legend
        row = [img.getpixel((x, y)) for x in range(img.width)]
        n = sum(1 for p in row if p == red)
        if n:
            widths.append(n)
    assert widths, "no prefill segment drawn"
    assert max(widths) / min(widths) == pytest.approx(4.0, rel=0.05)


# ------------------------------------------------------------------------------------------ end to end
def test_e2e_runs_on_the_tiny_model(tiny_model_dir: Path, sample_video: Path, tmp_path: Path) -> None:
    from PIL import Image

    from benchmarks import e2e

    data = e2e.main(
        [
            "--model-dir", str(tiny_model_dir), "--dtype", "float32", "--video", str(sample_video),
            "--frames", "2", "--repeats", "1", "--new-tokens", "3", "--presets", "fastest",
            "--out", str(tmp_path), "--name", "e2e_tiny", "--chart", str(tmp_path / "ttft.png"),
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "e2e_tiny.json").read_text())
    assert [r["arm"] for r in saved["blocks"][0]["rows"]] == ["baseline", "fastest"]
    base, fast = data["blocks"][0]["rows"]
    assert base["new_tokens"] == [3] and fast["new_tokens"] == [3]  # EOS suppressed: a fixed count
    assert base["prefix_kv_tokens"] == [0] == fast["prefix_kv_tokens"]  # whole prefills are timed
    per_frame = base["tokens_into_llm"] // 2
    assert base["tokens_into_llm"] == 2 * per_frame + 1  # T * N + the newline
    assert fast["tokens_into_llm"] < base["tokens_into_llm"]
    assert fast["tokens_after_inner"] < fast["tokens_into_llm"]  # the inner stage ran
    assert fast["kv_cache_bytes"] < base["kv_cache_bytes"]
    # TTFT is the sum of its stages; ratios are baseline / arm
    stages = fast["decode_video_s"] + fast["vision_s"] + fast["compress_s"] + fast["llm_first_token_s"]
    assert fast["ttft_s"] == pytest.approx(stages)
    assert fast["prefill_speedup"] == pytest.approx(base["prefill_s"] / fast["prefill_s"])
    assert "| fastest |" in (tmp_path / "e2e_tiny.md").read_text()
    assert Image.open(tmp_path / "ttft.png").size[0] == 1000


@pytest.mark.parametrize(
    ("shape", "model_type", "label"),
    [("qwen2_5_vl-tiny", "qwen2_5_vl", "Qwen2.5-VL-TINY"), ("qwen3_vl-tiny", "qwen3_vl", "Qwen3-VL-TINY")],
)
def test_e2e_builds_and_runs_the_tiny_qwen_shapes(
    shape: str, model_type: str, label: str, sample_video: Path, tmp_path: Path
) -> None:
    from benchmarks import e2e

    data = e2e.main(
        [
            "--shape", shape, "--cache", str(tmp_path / "models"), "--dtype", "float32",
            "--video", str(sample_video), "--frames", "8", "--repeats", "1", "--new-tokens", "3",
            "--presets", "fastest", "--out", str(tmp_path), "--name", "e2e_qwen",
        ]
    )  # fmt: skip
    config = json.loads((tmp_path / "models" / f"{shape}-float32" / "config.json").read_text())
    assert config["model_type"] == model_type  # the shape's builder ran; the loader chose the family
    assert data["model_label"].startswith(label)
    block = data["blocks"][0]
    base, fast = block["rows"]
    assert [base["arm"], fast["arm"]] == ["baseline", "fastest"]
    assert base["new_tokens"] == [3] and fast["new_tokens"] == [3]
    # The grid, by hand: the 96x64 clip is inside the tiny shapes' pixel budget, so each side is rounded to a
    # multiple of patch * merge (28 px for Qwen2.5-VL, 32 px for Qwen3-VL): 64 -> 2 rows, 96 -> 3 cols.
    vision = config["vision_config"]
    factor = vision["patch_size"] * vision["spatial_merge_size"]
    rows, cols = round(64 / factor), round(96 / factor)
    assert (rows, cols) == (2, 3)
    units = 8 // vision["temporal_patch_size"]
    assert block["video"]["temporal_units"] == units and block["video"]["grid"] == [rows, cols]
    assert base["tokens_into_llm"] == units * rows * cols  # no suffix token in the Qwen families
    assert fast["tokens_into_llm"] < base["tokens_into_llm"]
    assert fast["tokens_after_inner"] < fast["tokens_into_llm"]  # the inner stage ran
    assert fast["prefill_tflops"] < base["prefill_tflops"]
    assert fast["flops_ratio"] == pytest.approx(fast["prefill_tflops"] / base["prefill_tflops"])
    assert base["flops_ratio"] == 1.0
    md = (tmp_path / "e2e_qwen.md").read_text()
    assert f"{units} temporal units of 2 frame(s), {rows}x{cols} tokens each" in md and "| fastest |" in md


# ------------------------------------------------------------------------------------------ vs reference
def _ours_as_reference(features: torch.Tensor, attention: torch.Tensor, cfg) -> dict:
    from holitom_cli.compression import compress_video_tokens

    out = compress_video_tokens(features, attention, cfg)
    return {"features": out.features.clone(), "segments": list(out.segments), "reduced": out.reduced,
            "ratio": out.effective_ratio}  # fmt: skip


def test_vs_reference_outer_agreement_logic() -> None:
    """The agreement check accepts an identical output and flags each kind of difference."""
    from benchmarks.vs_reference import outer_agreement
    from holitom_cli.compression import HoliTomConfig, compress_video_tokens

    feats, scores, _ = synthetic_features(12, 49, 32, seed=1, mean_scene=5, dtype=torch.float32)
    cfg = HoliTomConfig(retain_ratio=0.25)
    ours = compress_video_tokens(feats, scores, cfg)
    same = outer_agreement(ours, _ours_as_reference(feats, scores, cfg), feats, cfg.tau)
    assert same["plan_equal"] and same["max_abs_diff"] == 0.0 and same["decisions_differing"] == 0
    shifted = _ours_as_reference(feats, scores, cfg)
    shifted["features"][3] += 0.5
    assert outer_agreement(ours, shifted, feats, cfg.tau)["max_abs_diff"] == pytest.approx(0.5)
    for key, value in [("segments", [(0, 11)]), ("reduced", ours.reduced + 1), ("ratio", 0.3)]:
        other = _ours_as_reference(feats, scores, cfg)
        other[key] = value
        row = outer_agreement(ours, other, feats, cfg.tau)
        assert not row["plan_equal"] and row["max_abs_diff"] is None


def test_vs_reference_inner_agreement_logic() -> None:
    from benchmarks.vs_reference import inner_agreement, inner_inputs, our_joins
    from holitom_cli.compression import merge_visual_states

    hidden, scores = inner_inputs(40, 16, torch.float32, seed=2)
    merged, kept = merge_visual_states(hidden, scores, 0.5)
    joins = our_joins(hidden, scores, 0.5)
    assert joins.shape == (20,) and set(joins.tolist()) <= set(kept.tolist())
    ref = {"kept": kept.clone(), "joins": joins.clone()}
    row = inner_agreement((merged, kept), (merged.clone(), kept), joins, ref)
    assert row == {"kept_equal": True, "joins_equal": True, "joins_differing": 0, "max_abs_diff": 0.0}
    ref["joins"] = joins.roll(1)
    assert not inner_agreement((merged, kept), (merged, kept), joins, ref)["joins_equal"]
    ref["kept"] = kept + 1
    assert inner_agreement((merged, kept), (merged, kept), joins, ref)["kept_equal"] is False


FAKE_ARCH = """
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import get_anyres_image_grid_shape
from llava.utils import rank0_print


class LlavaMetaForCausalLM_holitom:
    def cluster_dpc_knn(self, *a): raise NotImplementedError
    def select_static_windows(self, *a): raise NotImplementedError
    def merge_tokens_by_clustering(self, *a): raise NotImplementedError
    def merge_tokens_by_attention_density(self, *a): raise NotImplementedError
    def merge_tokens_by_density(self, *a): raise NotImplementedError
    def holitom(self, *a): raise NotImplementedError
    def get_static_dynamic_features(self, *a): raise NotImplementedError
"""

# A stand-in for the reference's inner block, in our own words: the same variable names, computed with
# holitom's own functions, then (SHIFT) optionally every join moved to the next kept token.
FAKE_QWEN2 = """
class Qwen2Model_holitom:
    def forward(self):
        if True:
            top_attention_rank_index = last_layer_attention_avg_last_tok_image.topk(
                round(HOLITOM_image_token_length * (1 - HOLITOM_r))).indices
            from holitom_cli.compression.inner import fold_members, most_similar
            device = hidden_states.device
            keep = top_attention_rank_index.numel()
            rest = torch.ones(HOLITOM_image_token_length, dtype=torch.bool)
            rest[top_attention_rank_index] = False
            non_topk_indices = torch.nonzero(rest).squeeze(1)
            sim_max_index = (most_similar(hidden_states[0, non_topk_indices],
                                          hidden_states[0, top_attention_rank_index]) + SHIFT) % keep
            sim_max_index = sim_max_index[None]
            kept, perm = torch.sort(top_attention_rank_index)
            slot = torch.empty_like(perm).scatter_(0, perm, torch.arange(keep))
            merged = fold_members(hidden_states[0], kept, non_topk_indices, slot[sim_max_index[0]])
            hidden_states[0, kept] = merged
            keep_indexs = kept
            hidden_states = hidden_states[:, keep_indexs, :]
"""


def _fake_clone(root: Path, shift: int) -> Path:
    (root / "holitom").mkdir(parents=True)
    (root / "holitom" / "llava_arch.py").write_text(FAKE_ARCH)
    (root / "holitom" / "modeling_qwen2.py").write_text(FAKE_QWEN2.replace("SHIFT", str(shift)))
    return root


@pytest.mark.parametrize("shift", [0, 1])
def test_vs_reference_main_on_a_fake_clone(tmp_path: Path, shift: int) -> None:
    """Loader (llava stubs, extraction of the inner block), timing, agreement and report, end to end."""
    from benchmarks import vs_reference

    clone = _fake_clone(tmp_path / "clone", shift)
    data = vs_reference.main(
        ["--reference", str(clone), "--frames", "--channels", "896", "--dtypes", "float32",
         "--inner-lengths", "30", "--repeats", "2", "--out", str(tmp_path), "--name", "vs"]
    )  # fmt: skip
    (row,) = data["rows"]
    assert row["stage"] == "inner" and row["kept_equal"]
    assert row["joins_equal"] is (shift == 0)
    assert len(row["ours_runs_s"]) == len(row["ref_runs_s"]) == 2
    assert row["speedup_min"] == pytest.approx(min(row["ref_runs_s"]) / min(row["ours_runs_s"]))
    assert "| float32 | 896 | 30 |" in (tmp_path / "vs.md").read_text()
    import sys as _sys

    assert "llava" not in _sys.modules  # the stubs are removed again


REFERENCE = os.environ.get("HOLITOM_REFERENCE", "")


@pytest.mark.skipif(
    not (REFERENCE and Path(REFERENCE, "holitom", "llava_arch.py").is_file()),
    reason="set HOLITOM_REFERENCE to a clone of cokeshao/HoliTom to compare against the official code",
)
def test_vs_reference_agrees_with_the_official_code(tmp_path: Path) -> None:
    from benchmarks import vs_reference

    data = vs_reference.main(
        ["--reference", REFERENCE, "--frames", "6", "12", "--channels", "896", "--dtypes", "float32",
         "--inner-lengths", "50", "--repeats", "1", "--warmup", "0", "--no-memory",
         "--out", str(tmp_path)]
    )  # fmt: skip
    for row in data["rows"]:
        assert row.get("plan_equal", True) and row.get("joins_equal", True), row
        assert row["max_abs_diff"] < 1e-5


# ------------------------------------------------------------------------------------------ DPC-KNN paths
def test_dpc_agreement_runs_and_finds_no_difference(tmp_path: Path) -> None:
    from benchmarks import dpc_agreement

    data = dpc_agreement.main(
        ["--seeds", "1", "--frames", "12", "--channels", "2048", "--presets", "balanced", "--dtypes",
         "bfloat16", "--repeats", "1", "--out", str(tmp_path)]
    )  # fmt: skip
    (row,) = data["rows"]
    assert row["segments"] >= 1 and row["differ"] == 0
    assert row["rows_settled"] + row["recomputed"] <= row["segments"]
    assert row["float64_ms"] > 0 and row["checked_ms"] > 0
    saved = json.loads((tmp_path / "dpc_agreement.json").read_text())
    assert saved["rows"][0]["segments"] == row["segments"]
    assert "| bfloat16 | balanced | 12 | 2,048 |" in (tmp_path / "dpc_agreement.md").read_text()
