"""Silence the library messages a holitom user did not ask for and cannot act on, and nothing else.

Each entry names the logger, the start of the message and why it is noise. Records are dropped by a filter on
the logger that emits them (a filter on a parent logger would not see them), so every other warning of the
same library still reaches the terminal.
"""

from __future__ import annotations

import logging

__all__ = ["NOISE", "quiet_library_noise"]

# (logger name, message prefix, why it is noise)
NOISE: tuple[tuple[str, str, str], ...] = (
    (
        "bitsandbytes.autograd._functions",
        "MatMul8bitLt: inputs will be cast",
        "logged on every int8 matmul (hundreds of lines per answer); the cast is how int8 inference works",
    ),
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "optional accelerated kernel package not installed; bitsandbytes falls back to its own CPU path",
    ),
    (
        "transformers.tokenization_utils_base",
        "Token indices sequence length is longer than the specified maximum",
        "a very long question; holitom checks every prompt against the model's context itself and refuses "
        "one that does not fit, with the numbers and what to change, before the model runs",
    ),
)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = str(record.msg)
        except Exception:  # pragma: no cover - a record whose message cannot be read: keep it
            return True
        return not message.startswith(self.prefixes)


_INSTALLED: dict[str, _DropPrefixes] = {}


def quiet_library_noise() -> None:
    """Install the filters once per process (idempotent)."""
    by_logger: dict[str, list[str]] = {}
    for name, prefix, _why in NOISE:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        if name in _INSTALLED:
            continue
        flt = _DropPrefixes(tuple(prefixes))
        logging.getLogger(name).addFilter(flt)
        _INSTALLED[name] = flt
