"""LLM prefill time as a function of the sequence length, measured one decoder layer at a time.

Timing a whole 7B (or even 0.5B) prefill at every token count of the scaling sweep would take hours on a
2-core CPU. Every decoder layer of a Qwen2 model has the same shape, so the prefill time of an L-layer model
is L x the time of one layer (plus an embedding look-up, a final norm and the LM head on one position, all
negligible next to the layers). This module builds ONE decoder layer of the real shape (random weights, in
the target dtype, SDPA attention, with a KV cache like ``generate``), times it at a few sequence lengths,
and fits ``t(n) = a + b n + c n^2`` (least squares; linear = projections and MLP, quadratic = attention).

``LayerCurve.prefill_s`` then gives the prefill of the full model, with the inner-LLM stage when asked:
``K t(n) + (L - K) t(n')``. Points inside the measured range are interpolations; outside, extrapolations
(the report says which).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from benchmarks._common import log, median, synchronize, timed


@dataclass
class LayerCurve:
    """Measured per-layer prefill times and the fitted quadratic ``t(n) = a + b n + c n^2`` (seconds)."""

    shape: str
    num_layers: int
    points: dict[int, float] = field(default_factory=dict)  # tokens -> median seconds per layer
    coef: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def fit(self) -> None:
        import numpy as np

        n = np.array(sorted(self.points), dtype=float)
        t = np.array([self.points[int(k)] for k in n])
        design = np.stack([np.ones_like(n), n, n * n], axis=1)
        a, b, c = np.linalg.lstsq(design, t, rcond=None)[0]
        # Negative curvature/offset from noise would make extrapolations absurd: clamp at 0 and refit.
        if c < 0:
            c = 0.0
            a, b = np.linalg.lstsq(design[:, :2], t, rcond=None)[0]
        self.coef = (float(max(a, 0.0)), float(b), float(c))

    def layer_s(self, tokens: int) -> float:
        a, b, c = self.coef
        return a + b * tokens + c * tokens * tokens

    def prefill_s(
        self, tokens: int, inner_layer: int | None = None, tokens_after: int | None = None
    ) -> float:
        """Estimated full-model prefill; layers >= ``inner_layer`` see ``tokens_after`` tokens."""
        if inner_layer is None or tokens_after is None:
            return self.num_layers * self.layer_s(tokens)
        return inner_layer * self.layer_s(tokens) + (self.num_layers - inner_layer) * self.layer_s(
            tokens_after
        )

    def extrapolated(self, tokens: int) -> bool:
        return tokens > max(self.points) * 1.05

    def to_dict(self) -> dict:
        return {"shape": self.shape, "num_layers": self.num_layers, "points": self.points, "coef": self.coef}


def build_layer(
    shape: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> tuple[object, object]:
    """(model with ONE decoder layer of ``shape``'s language model, its config), random weights."""
    from transformers import Qwen2Config, Qwen2Model

    from holitom_cli.models.random_model import SHAPES

    s = SHAPES[shape]
    cfg = Qwen2Config(
        hidden_size=s.text_hidden,
        intermediate_size=s.text_ffn,
        num_hidden_layers=1,
        num_attention_heads=s.text_heads,
        num_key_value_heads=s.text_kv_heads,
        vocab_size=32,  # embeddings are not used: the layer is fed inputs_embeds
        max_position_embeddings=131072,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
    )
    model = Qwen2Model._from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    return model, cfg


def measure_layer_curve(
    shape: str,
    token_counts: list[int],
    repeats: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> LayerCurve:
    """Time one decoder layer of ``shape`` at each token count (median of ``repeats`` after a warm-up).

    The warm-up is per token count: oneDNN builds its kernels for each new input shape on first use.
    """
    from transformers import DynamicCache

    from holitom_cli.models.compat import cache_keyword
    from holitom_cli.models.random_model import SHAPES

    model, cfg = build_layer(shape, dtype, device)
    curve = LayerCurve(shape=shape, num_layers=SHAPES[shape].text_layers)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in token_counts:
            x = torch.randn(1, n, cfg.hidden_size, generator=g).to(device=device, dtype=dtype)
            model(
                inputs_embeds=x, use_cache=True, **{cache_keyword(model): DynamicCache(config=cfg)}
            )  # per-shape warm-up
            times = []
            for _ in range(repeats):
                synchronize(device)
                _, dt = timed(
                    lambda x=x, model=model: model(
                        inputs_embeds=x, use_cache=True, **{cache_keyword(model): DynamicCache(config=cfg)}
                    ),
                    device,
                )
                times.append(dt)
            curve.points[n] = median(times)
            log(f"  {shape} one layer, {n} tokens: {curve.points[n] * 1e3:.0f} ms")
    del model
    curve.fit()
    return curve
