"""Memory of the outer stage, checked deterministically (allocation sizes, never timings).

- no single tensor the size of the features (let alone a (T, N, C) float32 copy) is created by
  ``compress_video_tokens``, for bf16 and float32 input, whatever the chunk size;
- the allocator's peak above the inputs stays within 2.5x the input (replayed ``torch.profiler`` memory
  events, the same measurement as ``benchmarks/scaling.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from holitom_cli.compression import HoliTomConfig, compress_video_tokens, core, merge_visual_states, temporal

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import torch_peak_alloc_bytes  # noqa: E402
from benchmarks.synthetic import synthetic_features  # noqa: E402


class NewStorages(TorchDispatchMode):
    """Records the byte size of every storage first seen as an op output (inputs excluded)."""

    def __init__(self, *known: torch.Tensor) -> None:
        super().__init__()
        self.seen = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in known}
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                if key not in self.seen:
                    self.seen.add(key)
                    self.sizes.append(key[1])
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk_frames", [1, 4])
def test_no_feature_sized_temporary(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, chunk_frames: int
) -> None:
    feats, scores, _ = synthetic_features(24, 49, 128, seed=0, mean_scene=6, dtype=dtype)
    monkeypatch.setattr(temporal, "CPU_CHUNK_BYTES", chunk_frames * 49 * 128 * 4)
    frame_f32 = 49 * 128 * 4
    monkeypatch.setattr(core, "BATCH_BYTES", 2 * frame_f32)  # the segments' means, clustered in batches
    with NewStorages(feats, scores) as mode:
        out = compress_video_tokens(feats, scores, HoliTomConfig(retain_ratio=0.25))
    input_bytes = feats.numel() * feats.element_size()
    # the largest tensors: the output (M, C), the float32 chunk buffers, the float64 static means, the
    # batch store (its budget, rounded up to a power of two)
    bound = max(out.features.numel() * out.features.element_size(), chunk_frames * frame_f32, 4 * frame_f32)
    assert max(mode.sizes) <= bound
    assert max(mode.sizes) < 0.5 * input_bytes  # nothing close to a (T, N, C) copy, in any dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_peak_memory_within_two_and_a_half_times_the_input(dtype: torch.dtype) -> None:
    feats, scores, _ = synthetic_features(48, 196, 896, seed=1, dtype=dtype)
    cfg = HoliTomConfig(retain_ratio=0.2)
    compress_video_tokens(feats, scores, cfg)
    _, peak = torch_peak_alloc_bytes(lambda: compress_video_tokens(feats, scores, cfg))
    assert peak <= 2.5 * feats.numel() * feats.element_size()


def test_inner_merge_temporaries_are_span_sized() -> None:
    hidden = torch.randn(300, 64).bfloat16()
    scores = torch.rand(300)
    with NewStorages(hidden, scores) as mode:
        merge_visual_states(hidden, scores, 0.5)
    # largest: the kept states in float32 (K x C x 4) or the (P, K) similarity; never more than 2x the span
    assert max(mode.sizes) <= 2 * hidden.numel() * hidden.element_size()
