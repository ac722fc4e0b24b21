"""Smoke tests of the benchmark scripts' pure parts (the benchmarks themselves are run by hand).

- the paper-table script reproduces the paper's FLOPs numbers with the paper's formula;
- the prefill-curve fit recovers known coefficients and combines layers as K t(n) + (L-K) t(n');
- the synthetic features have the temporal structure they claim (cuts, moving object, slow drift);
- the Pillow chart draws bars whose lengths follow the data;
- the end-to-end script runs on the tiny random model (2 frames, 1 repeat) and writes its outputs.
"""

from __future__ import annotations

import json
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
