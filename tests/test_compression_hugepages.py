"""The huge-page hint for the big CPU output (holitom_cli.compression.memory): a hint only, never a change
of values, sizes or ownership; applied to large CPU tensors only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from holitom_cli.compression import memory


def _thp_mode() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.is_file():
        return None
    text = path.read_text()
    return text[text.index("[") + 1 : text.index("]")]


def test_small_tensors_are_left_alone() -> None:
    small = torch.empty(1024, dtype=torch.float32)
    assert memory.advise_huge_pages(small) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux-only")
def test_large_output_is_advised_and_behaves_like_new_empty() -> None:
    like = torch.zeros(2, 3, dtype=torch.bfloat16)
    rows, cols = 5000, 3584  # 34 MiB of bf16, above HUGE_PAGE_MIN_BYTES
    out = memory.empty_output(like, rows, cols)
    assert (out.shape, out.dtype, out.device) == ((rows, cols), torch.bfloat16, like.device)
    assert out.untyped_storage().nbytes() == rows * cols * 2  # no over-allocation, no offset
    assert out.storage_offset() == 0 and out.is_contiguous()
    values = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols).to(torch.bfloat16)
    out.copy_(values)
    assert torch.equal(out, values)
    # the hint itself: accepted whenever the kernel has transparent huge pages at all
    again = torch.empty(rows, cols, dtype=torch.bfloat16)
    accepted = memory.advise_huge_pages(again)
    if _thp_mode() in {"always", "madvise"}:
        assert accepted
