"""Large CPU output buffers backed by transparent huge pages where the OS allows it (issue 13).

glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it on free, so each call's
(M, C) output touches fresh 4 KiB pages: one page fault per 4 KiB, which on a virtual machine costs as much
as computing the output (36 MB at T = 128, C = 3584: ~30 ms of faults). Marking the fresh range
``MADV_HUGEPAGE`` before the first write lets Linux back it with 2 MiB pages (512x fewer faults), when the
system's transparent-huge-page mode is ``madvise`` or ``always``. This is what torch itself does for every
allocation when ``THP_MEM_ALLOC_ENABLE=1`` is set at start-up; here it applies to the one big output only.

It is a hint: values, sizes and the allocator are unchanged (torch still owns and frees the memory), and on
other systems, on accelerators, for small tensors, or if the call fails, nothing happens.
"""

from __future__ import annotations

import ctypes
import sys

import torch

__all__ = ["HUGE_PAGE_MIN_BYTES", "empty_output"]

#: Only tensors at least this large are advised (smaller ones come from glibc's reused heap, already warm).
HUGE_PAGE_MIN_BYTES = 16 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
_madvise = None  # resolved on first use; False when unavailable


def _resolve_madvise():
    global _madvise
    if _madvise is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    return _madvise


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back the 2 MiB-aligned part of ``tensor``'s (not yet touched) memory with huge pages.

    Returns True when the hint was accepted. Only whole 2 MiB ranges inside the tensor are advised.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return False
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < HUGE_PAGE_MIN_BYTES:
        return False
    fn = _resolve_madvise()
    if not fn:
        return False
    start = tensor.data_ptr()
    first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
    last = (start + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    return last > first and fn(first, last - first, _MADV_HUGEPAGE) == 0


def empty_output(like: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``like.new_empty(rows, cols)``, advised to huge pages when large (see the module docstring)."""
    out = like.new_empty(rows, cols)
    advise_huge_pages(out)
    return out
