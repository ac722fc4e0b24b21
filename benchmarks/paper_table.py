"""Reproduce the paper's efficiency table: prefill FLOPs of the baseline and every preset at 32 frames.

For LLaVA-OneVision-7B and -72B, baseline (all 32 x 196 video tokens) and each preset, with and without the
inner-LLM stage, this prints:

- the paper's number (transcribed from its tables; only the settings the paper reports),
- the paper's formula recomputed (``paper_prefill_flops``: visual tokens only, no text, no GQA, two MLP
  matrices), with the visual-token count the paper uses, ``T * ceil(N * r)``,
- the exact count of what our forward pass runs (``exact_prefill_flops``: text + video + newline tokens,
  GQA projections, the three SwiGLU matrices, causal attention pairs, the LM head on the last position),
- the FLOPs of the first decode step after the prefill (``decode_step_flops``), which is what bounds the
  decode-speed gain: it shrinks only through the attention over a shorter KV cache.

Pure arithmetic, no model is built: ``python -m benchmarks.paper_table [--out benchmarks/out]``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from benchmarks._common import DEFAULT_OUT, command_line, md_table, publish

FRAMES = 32
TOKENS_PER_FRAME = 196
#: Text tokens of a typical prompt (system prompt, chat markers, a one-line question) around the video.
TEXT_TOKENS = 40

#: The paper's prefill TFLOPs (spec section 9): {model: {setting: TFLOPs}}; setting = preset name + "/M" or
#: "/no-M" (outer stage only), or "baseline". Presets map to retain ratios 10/15/20/25 %.
PAPER_TFLOPS: dict[str, dict[str, float]] = {
    "7b": {
        "baseline": 40.8,
        "fastest/no-M": 3.4,
        "fastest/M": 2.8,
        "fast/no-M": 5.2,
        "fast/M": 4.3,
        "balanced/no-M": 7.0,
        "balanced/M": 5.8,
        "accurate/no-M": 8.7,
        "accurate/M": 7.1,
    },
    "72b": {"baseline": 429.3, "fast/no-M": 59.0, "fast/M": 51.6},
}


def language_shape(name: str) -> Any:
    """The ``LanguageModelShape`` of a random-model shape name (``0.5b``, ``7b``, ``72b``)."""
    from holitom_cli.compression import LanguageModelShape
    from holitom_cli.models.random_model import SHAPES

    s = SHAPES[name]
    return LanguageModelShape(
        num_layers=s.text_layers,
        hidden_size=s.text_hidden,
        ffn_size=s.text_ffn,
        num_heads=s.text_heads,
        num_kv_heads=s.text_kv_heads,
        head_dim=s.text_hidden // s.text_heads,
        vocab_size=s.vocab_size,
    )


def table_rows(model: str, frames: int = FRAMES, text_tokens: int = TEXT_TOKENS) -> list[dict[str, Any]]:
    """One dict per (baseline | preset x {outer only, with inner stage}) for ``model`` ("7b" or "72b")."""
    from holitom_cli.compression import (
        PRESETS,
        decode_step_flops,
        exact_prefill_flops,
        inner_keep_count,
        paper_prefill_flops,
    )

    shape = language_shape(model)
    L, d, m = shape.num_layers, shape.hidden_size, shape.ffn_size
    paper = PAPER_TFLOPS.get(model, {})
    full_visual = frames * TOKENS_PER_FRAME

    def row(setting: str, retain: float | None, visual: int, inner_layer: int | None, prune: float) -> dict:
        formula = paper_prefill_flops(L, d, m, visual, inner_layer, prune)
        seq = text_tokens + visual + 1  # + the one image_newline after the video
        removed = 0
        if inner_layer is not None:
            removed = (visual + 1) - inner_keep_count(visual + 1, prune)  # newline is a candidate too
        exact = exact_prefill_flops(shape, seq, removed, inner_layer)
        ctx = [n + 1 for n in exact["tokens_per_layer"]]  # first decode step: cache + the new token
        return {
            "model": model,
            "setting": setting,
            "retain_ratio": retain,
            "inner_layer": inner_layer,
            "visual_tokens": visual,
            "seq_len": seq,
            "paper_tflops": paper.get(setting),
            "formula_tflops": formula / 1e12,
            "exact_tflops": exact["total"] / 1e12,
            "exact_attention_tflops": exact["attention"] / 1e12,
            "decode_step_gflops": decode_step_flops(shape, ctx) / 1e9,
        }

    rows = [row("baseline", None, full_visual, None, 0.0)]
    for name, cfg in PRESETS.items():
        visual = frames * math.ceil(TOKENS_PER_FRAME * cfg.retain_ratio)  # the paper's count (no R)
        rows.append(row(f"{name}/no-M", cfg.retain_ratio, visual, None, 0.0))
        rows.append(
            row(f"{name}/M", cfg.retain_ratio, visual, cfg.resolve_inner_layer(L), cfg.inner_prune_ratio)
        )
    base = rows[0]
    for r in rows:
        r["formula_ratio"] = r["formula_tflops"] / base["formula_tflops"]
        r["exact_ratio"] = r["exact_tflops"] / base["exact_tflops"]
        r["paper_ratio"] = (
            round(r["paper_tflops"], 1) / round(paper["baseline"], 1)
            if r["paper_tflops"] is not None and "baseline" in paper
            else None
        )
        r["decode_step_ratio"] = base["decode_step_gflops"] / r["decode_step_gflops"]
    return rows


def markdown(rows_by_model: dict[str, list[dict[str, Any]]]) -> str:
    headers = [
        "model",
        "setting",
        "visual tokens",
        "paper TFLOPs",
        "paper %",
        "formula TFLOPs",
        "formula %",
        "exact TFLOPs",
        "exact %",
        "decode step GFLOPs",
        "decode FLOPs gain",
    ]
    out = []
    for model, rows in rows_by_model.items():
        table = [
            [
                f"LLaVA-OV-{model.upper()}",
                r["setting"],
                r["visual_tokens"],
                r["paper_tflops"],
                None if r["paper_ratio"] is None else 100 * r["paper_ratio"],
                r["formula_tflops"],
                100 * r["formula_ratio"],
                r["exact_tflops"],
                100 * r["exact_ratio"],
                r["decode_step_gflops"],
                f"{r['decode_step_ratio']:.2f}x",
            ]
            for r in rows
        ]
        out.append(md_table(headers, table, digits=1))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (JSON + markdown)")
    ap.add_argument("--frames", type=int, default=FRAMES)
    ap.add_argument("--text-tokens", type=int, default=TEXT_TOKENS, help="prompt text tokens (exact count)")
    args = ap.parse_args(argv)
    rows = {m: table_rows(m, args.frames, args.text_tokens) for m in ("7b", "72b")}
    md = (
        f"Prefill FLOPs at {args.frames} frames x {TOKENS_PER_FRAME} tokens "
        f"(exact count: + {args.text_tokens} text tokens + 1 newline).\n\n" + markdown(rows)
    )
    data = {"command": command_line(), "frames": args.frames, "text_tokens": args.text_tokens, "rows": rows}
    publish(args.out, "paper_table", data, md)
    return data


if __name__ == "__main__":
    main()
