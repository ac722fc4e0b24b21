"""Helpers shared by the benchmark scripts: machine description, timing, memory, tables, output files.

Nothing here knows about models; torch is imported lazily so that ``paper_table`` stays import-light.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out"


# ----------------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """A description of the machine and software the numbers were taken on (goes into every JSON)."""
    import psutil
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": device,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a hard dependency of the project
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for the markdown reports."""
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (
        f"{info['cpu']}, {info['logical_cores']} logical cores ({info['torch_threads']} torch threads), "
        f"{info['ram_gb']} GB RAM{gpu}; Python {info['python']}, torch {info['torch']}, "
        f"transformers {info.get('transformers', '?')}; device {info['device']}; "
        f"1-min load average at start {info['load_avg_1m_at_start']}"
    )


# ----------------------------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    """Wait for queued GPU work so wall-clock timings are honest (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def timed(fn: Callable[[], Any], device: str = "cpu") -> tuple[Any, float]:
    """Run ``fn`` once and return (its result, wall seconds), synchronising the device on both sides."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("nan")


# ----------------------------------------------------------------------------------------------- memory
def torch_peak_alloc_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Peak bytes allocated by torch on the CPU while ``fn`` runs, above what was allocated before.

    Uses ``torch.profiler`` with ``profile_memory=True`` and replays its allocation/free events in time
    order (tracemalloc does not see torch's allocator; RSS deltas are blurred by glibc's heap reuse).
    Tensors that exist before the call (the inputs) are not counted. Slower than an unprofiled run, so
    never time the same call.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            cur += e.nbytes()
            peak = max(peak, cur)
    return out, peak


class RssSampler:
    """Samples the process RSS in a background thread; ``peak - start`` approximates a stage's footprint.

    Used for the end-to-end runs, where weights are already resident: the number is the growth of the
    resident set during the measured call (activations, KV cache, temporaries), sampled every ``interval``
    seconds, so very short spikes can be missed.
    """

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.start_rss = 0
        self.peak_rss = 0

    def __enter__(self) -> RssSampler:
        self.start_rss = self.peak_rss = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    @property
    def delta_bytes(self) -> int:
        return self.peak_rss - self.start_rss


def materialize_weights(module: Any) -> int:
    """Copy every parameter and buffer of ``module`` into ordinary (anonymous) memory; returns the bytes.

    ``load_model`` leaves CPU weights memory-mapped from the safetensors file. Where the kernel reclaims
    cold page-cache pages proactively (this VM runs DAMON's ``kdamond``), parts of the weights are evicted
    between forward passes and re-read from disk, which made timings disk-bound and bimodal. Copying them once
    keeps every pass compute-bound. Instance-scoped: only this loaded model is touched.
    """
    import torch

    seen: set[int] = set()
    total = 0
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in seen or tensor.device.type != "cpu":
                continue
            seen.add(id(tensor))
            tensor.data = tensor.data.clone()
            total += tensor.numel() * tensor.element_size()
    return total


# ----------------------------------------------------------------------------------------------- output
def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    """A GitHub markdown table; numbers right-aligned, floats with ``digits`` decimals."""
    rows = [list(r) for r in rows]
    align = []
    for i in range(len(headers)):
        numeric = rows and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
        align.append("---:" if numeric else "---")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(v, digits) for v in r) + " |")
    return "\n".join(lines)


def write_outputs(out_dir: Path, name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir`` (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath = out_dir / f"{name}.json"
    mpath = out_dir / f"{name}.md"
    jpath.write_text(json.dumps(data, indent=2, default=str) + "\n")
    mpath.write_text(markdown.rstrip() + "\n")
    return jpath, mpath


def publish(out_dir: Path, name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """:func:`write_outputs`, then the markdown on stdout and where it went on stderr."""
    jpath, mpath = write_outputs(out_dir, name, data, markdown)
    print(markdown)
    log(f"wrote {jpath} and {mpath}")
    return jpath, mpath


def command_line() -> str:
    """The command that produced a report, as a user would type it from the repository root."""
    script = Path(sys.argv[0])
    try:
        rel = script.resolve().relative_to(REPO_ROOT)
        mod = ".".join(rel.with_suffix("").parts)
        prog = f"python -m {mod}"
    except ValueError:
        prog = f"python {script}"
    return " ".join([prog, *sys.argv[1:]])


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays clean."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
