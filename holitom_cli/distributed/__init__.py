"""``holitom batch --workers N``: the same batch on Ray Data, across GPUs and machines (issue 12).

This package is the only place that imports Ray, and only lazily: importing it (or anything in holitom_cli
outside it) never imports ``ray``. :func:`require_ray` is the cheap check run before anything else when
``--workers`` is given; :mod:`holitom_cli.distributed.ray_batch` (which imports Ray) runs the items.

Ray is an optional extra: ``pip install "holitom[ray]"``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from importlib import metadata

from holitom_cli.errors import ConfigError

#: The extra that brings Ray (``pyproject.toml``'s ``[project.optional-dependencies] ray``).
RAY_EXTRA = 'pip install "holitom[ray]"'
#: The oldest Ray this code is written and tested against (Ray Data's ActorPoolStrategy, max_errored_blocks).
MIN_RAY = (2, 60)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def require_ray() -> str:
    """Ray's version, or a one-line ConfigError naming the extra when Ray (and Ray Data) is missing or old.

    Looks at the installed distributions only: nothing is imported.
    """
    missing = [name for name in ("ray", "pyarrow") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--workers needs Ray, which is not installed: {RAY_EXTRA}")
    try:
        version = metadata.version("ray")
    except metadata.PackageNotFoundError:  # importable but not installed as a distribution (a source tree)
        return "unknown"
    if _version_tuple(version) < MIN_RAY:
        wanted = ".".join(str(p) for p in MIN_RAY)
        raise ConfigError(f"--workers needs Ray >= {wanted} (found {version}): {RAY_EXTRA} --upgrade")
    return version


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray: ``workers`` actors (one loaded pipeline each), where, and with how much GPU.

    ``address``: None starts a private, loopback-only Ray instance on this machine for the run (stopped at the
    end); otherwise the address of a running cluster (``ray start --head`` prints it; ``auto`` finds a local
    one). ``gpus_per_worker``: None means 1 when the cluster has GPUs and ``device`` is not ``cpu``, else 0;
    fractions (0.5) put several workers on one GPU; at most 1 (a pipeline runs on one device). ``num_cpus``:
    CPUs of the private instance (default: this machine's); ignored with ``address``. ``verbose``: let Ray's
    own log messages through to the terminal.
    """

    workers: int
    address: str | None = None
    gpus_per_worker: float | None = None
    num_cpus: int | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        w = self.workers
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ConfigError(f"--workers must be an integer >= 1, got {w!r}", hint="e.g. --workers 2")
        g = self.gpus_per_worker
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, int | float) or not math.isfinite(g) or g < 0:
                raise ConfigError(
                    f"--gpus-per-worker must be a number >= 0, got {g!r}",
                    hint="e.g. 1, or 0.5 for two workers per GPU",
                )
            if g > 1:
                raise ConfigError(
                    f"--gpus-per-worker must be at most 1, got {g:g}: a worker loads its model on one GPU",
                    hint="Use 1 (one GPU each) or a fraction such as 0.5 (two workers share a GPU).",
                )
        if self.address is not None and not self.address.strip():
            raise ConfigError("--ray-address is empty", hint="e.g. --ray-address 10.0.0.1:6379, or auto")
        n = self.num_cpus
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"num_cpus must be an integer >= 1, got {n!r}")

    def check_device(self, device: str) -> None:
        """Settings that cannot work together with ``--device`` (cheap: before the output is opened)."""
        if device.startswith("cuda:"):
            raise ConfigError(
                f"--device {device} cannot be used with --workers: Ray gives each worker its own GPU(s)",
                hint="Use --device cuda (or auto) and --gpus-per-worker; Ray sets CUDA_VISIBLE_DEVICES.",
            )
        if device in ("cpu", "mps") and self.gpus_per_worker:
            raise ConfigError(
                f"--gpus-per-worker {self.gpus_per_worker:g} needs a GPU device, but --device is {device}",
                hint="Drop --gpus-per-worker, or use --device cuda (or auto).",
            )


__all__ = ["MIN_RAY", "RAY_EXTRA", "RayOptions", "require_ray"]
