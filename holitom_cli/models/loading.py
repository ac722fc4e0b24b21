"""Resolving, downloading and loading checkpoints; the family registry; device and dtype selection.

``load_model(model, ...)`` accepts a Hugging Face hub id (downloaded with huggingface-hub into the standard
cache, which honours ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``; progress bars go to stderr) or a
local folder. It reads the checkpoint's ``config.json``, picks the family adapter registered for its
``model_type`` in ``FAMILIES`` (adding a family = one module with a
:class:`~holitom_cli.models.base.VideoAdapter` and a ``load(path, ...)`` function + one line here) and returns
that adapter. The family's own metadata (``FAMILY``, ``DISPLAY_NAME``, ``DEFAULT_CHECKPOINTS``,
``QUANTIZATION_SKIP``) lives in its module: nothing here knows a family. ``trust_remote_code`` is never
used: families are implemented here.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from holitom_cli.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from holitom_cli.models.base import VideoAdapter

#: config.json ``model_type`` -> module implementing the family (it defines ``load(path, *, device, dtype,
#: quantization, quantize, name)`` returning a ``VideoAdapter``, and the metadata constants ``FAMILY``,
#: ``DISPLAY_NAME``, ``DEFAULT_CHECKPOINTS``, ``QUANTIZATION_SKIP``).
FAMILIES: dict[str, str] = {
    "llava_onevision": "holitom_cli.models.llava_onevision",
    "qwen2_5_vl": "holitom_cli.models.qwen2_5_vl",
    "qwen3_vl": "holitom_cli.models.qwen3_vl",
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(FAMILIES)

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
QUANTIZE = ("8bit", "4bit")

# Files a checkpoint needs (weights only as safetensors: never pickles).
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
_OFFLINE_HINT = (
    "download it first while online (`holitom download {model}`), or pass a local checkpoint folder"
)


def __getattr__(name: str) -> Any:
    """``VideoLanguageModel``: the old name of :class:`holitom_cli.models.base.VideoAdapter` (imported on use,
    so that importing this module does not import torch)."""
    if name in ("VideoLanguageModel", "VideoAdapter"):
        from holitom_cli.models.base import VideoAdapter

        return VideoAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def family_module(family: str) -> Any:
    """The module implementing a registered family (imports torch and the family's code)."""
    return importlib.import_module(FAMILIES[family])


def family_info() -> list[dict[str, Any]]:
    """Every registered family's metadata, from its adapter module: ``family`` (``model_type``), ``name``,
    ``checkpoints`` (hub ids), in registry order."""
    out = []
    for family in FAMILIES:
        module = family_module(family)
        out.append(
            {
                "family": family,
                "name": getattr(module, "DISPLAY_NAME", family),
                "checkpoints": list(getattr(module, "DEFAULT_CHECKPOINTS", ())),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------- device /
# dtype


_DEVICE = re.compile(r"(auto|cpu|cuda|mps)(?::(\d{1,4}))?")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; an explicit device must exist (``cuda:1`` accepted).

    Anything else (``cpu:junk``, ``foo``, ``cuda:99`` on a 1-GPU machine) is a ConfigError, never a torch
    RuntimeError.
    """
    import torch

    names = ", ".join(DEVICES)
    text = device.strip().lower() if isinstance(device, str) else ""
    match = _DEVICE.fullmatch(text)
    if match is None:
        raise ConfigError(
            f"unknown device {device!r}", hint=f"use one of: {names} (or cuda:N for the N-th GPU)"
        )
    kind, index = match.group(1), match.group(2)
    if index is not None and kind in ("auto", "cpu"):
        raise ConfigError(
            f"unknown device {device!r}: only cuda (and mps) take an index",
            hint=f"use {kind}, or cuda:N for the N-th GPU",
        )
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} requested but no CUDA GPU is available", hint="use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise ConfigError(
                f"device {device!r} requested but this machine has {count} CUDA GPU(s) (cuda:0 to "
                f"cuda:{count - 1})",
                hint="use --device cuda (the first GPU) or a smaller index",
            )
    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(
                "device 'mps' requested but MPS is not available", hint="use --device cpu or auto"
            )
        if index is not None and int(index) != 0:
            raise ConfigError(f"unknown device {device!r}: there is one MPS device", hint="use --device mps")
    try:
        return torch.device(text)
    except (RuntimeError, ValueError) as exc:  # defensive: torch's own parser has the last word
        raise ConfigError(f"unknown device {device!r} ({exc})", hint=f"use one of: {names}") from exc


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs and CPUs with native bf16, fp16 on older GPUs and mps, else fp32."""
    import torch

    if dtype != "auto":
        if dtype not in DTYPES:
            names = ", ".join(["auto", "float32", "bfloat16", "float16"])
            raise ConfigError(f"unknown dtype {dtype!r}", hint=f"use one of: {names}")
        return getattr(torch, DTYPES[dtype])
    if device.type == "cuda":
        # without including_emulation=False, torch reports bf16 on pre-Ampere GPUs too (emulated, slow)
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "mps":
        return torch.float16
    try:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native_bf16 = False
    return torch.bfloat16 if native_bf16 else torch.float32


# ----------------------------------------------------------------------------------------------- hub / cache


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, ...
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _looks_like_path(model: str) -> bool:
    """A path rather than a hub id ("owner/name"): explicit prefixes, backslashes, several slashes."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1 or _exists(Path(model))


def _hub_error(exc: Exception, model: str, revision: str | None) -> ModelError:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return ModelError(
            f"{model} is a gated model", hint="accept its licence on the hub and run `hf auth login`"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return ModelError(
            f"revision {revision!r} not found for {model}", hint="check the branch, tag or commit"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ModelError(
            f"no model named {model!r} on the Hugging Face hub (or it is private)",
            hint="check the id, e.g. llava-hf/llava-onevision-qwen2-0.5b-ov-hf, or pass a local folder",
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return ModelError(
            f"{model} is not in the local cache and the hub cannot be reached (offline or no network)",
            hint=_OFFLINE_HINT.format(model=model),
        )
    if isinstance(exc, errors.HFValidationError):
        return ModelError(
            f"{model!r} is neither a local folder nor a valid hub id", hint="use owner/name or a path"
        )
    return ModelError(
        f"could not download {model}: {exc}", hint="check your network connection and the model id"
    )


def resolve_checkpoint(model: str, *, revision: str | None = None, offline: bool = False) -> Path:
    """A local folder, or a hub id downloaded (or found, when offline) in the standard cache."""
    if not isinstance(model, str) or not model.strip():
        raise ConfigError("no model given", hint="pass a hub id or a local checkpoint folder")
    try:
        local = Path(model).expanduser()
    except RuntimeError:  # "~someone/..." with no such user
        local = Path(model)
    if _is_dir(local):
        return local
    if _looks_like_path(model):
        raise ModelError(
            f"model folder not found: {model}", hint="check the path, or give a hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            model, revision=revision, local_files_only=offline, allow_patterns=_ALLOW_PATTERNS
        )
    except Exception as exc:  # huggingface_hub raises many kinds; all become ModelError
        raise _hub_error(exc, model, revision) from exc
    return Path(folder)


def download_model(model: str, revision: str | None = None) -> Path:
    """Download a hub checkpoint into the standard cache (progress on stderr) and return its folder."""
    path = resolve_checkpoint(model, revision=revision, offline=False)
    read_model_type(path)  # fail early on an unsupported architecture
    return path


#: config.json files larger than this are refused (a real one is a few KB; never read a huge file whole).
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def read_config(config_file: Path) -> dict[str, Any]:
    """A checkpoint's ``config.json`` as a dict; ModelError when unreadable, not JSON or not an object."""
    damaged = "the checkpoint is damaged or incomplete; download it again"
    try:
        size = config_file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ModelError(
                f"{config_file} is {size:,} bytes, too large for a model config (at most "
                f"{MAX_CONFIG_BYTES:,})",
                hint=damaged,
            )
        text = config_file.read_bytes().decode("utf-8")
        config = json.loads(text)
    except ModelError:
        raise
    except PermissionError as exc:
        raise ModelError(
            f"cannot read {config_file}: permission denied", hint="check the file's permissions"
        ) from exc
    except OSError as exc:
        raise ModelError(f"cannot read {config_file}: {exc.strerror or exc}", hint=damaged) from exc
    except UnicodeDecodeError as exc:
        raise ModelError(f"{config_file} is not UTF-8 text ({exc.reason})", hint=damaged) from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"{config_file} is not valid JSON ({exc})", hint=damaged) from exc
    if not isinstance(config, dict):
        kinds = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
        kind = "null" if config is None else kinds.get(type(config), type(config).__name__)
        raise ModelError(
            f"{config_file} holds {kind}, not a JSON object with the model's settings",
            hint=damaged,
        )
    return config


def read_model_type(path: Path) -> str:
    """The checkpoint's ``model_type``; ModelError when missing or unsupported."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"{path} has no config.json, so it is not a model checkpoint",
            hint="pass the folder that holds config.json and the weights",
        )
    config = read_config(config_file)
    model_type = config.get("model_type")
    supported = (
        f"supported families: {', '.join(SUPPORTED_FAMILIES)} (e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf)"
    )
    if model_type is None:
        raise ModelError(f"{config_file} has no model_type, so the architecture is unknown", hint=supported)
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ModelError(f"unsupported model architecture {model_type!r} in {path}", hint=supported)
    return model_type


@dataclass(frozen=True)
class CachedModel:
    """One model repository in the local Hugging Face cache."""

    repo_id: str
    size_bytes: int
    revisions: tuple[str, ...]  # commit hashes (first 12 characters)
    refs: tuple[str, ...]  # branch / tag names pointing into the cache
    last_modified: float
    model_type: str | None
    supported: bool
    path: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "size_bytes": self.size_bytes,
            "revisions": list(self.revisions),
            "refs": list(self.refs),
            "last_modified": self.last_modified,
            "model_type": self.model_type,
            "supported": self.supported,
            "path": self.path,
        }


def list_cached_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """Models in the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), newest first."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    found: list[CachedModel] = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        model_type = None
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            config_file = Path(revision.snapshot_path) / "config.json"
            if config_file.is_file():
                try:
                    model_type = read_config(config_file).get("model_type")
                except ModelError:
                    model_type = None
                if not isinstance(model_type, str):
                    model_type = None
                break
        refs = sorted({ref for revision in repo.revisions for ref in revision.refs})
        found.append(
            CachedModel(
                repo_id=repo.repo_id,
                size_bytes=int(repo.size_on_disk),
                revisions=tuple(sorted(r.commit_hash[:12] for r in repo.revisions)),
                refs=tuple(refs),
                last_modified=float(repo.last_modified),
                model_type=model_type,
                supported=model_type in FAMILIES,
                path=str(repo.repo_path),
            )
        )
    found.sort(key=lambda m: m.last_modified, reverse=True)
    return found


# ----------------------------------------------------------------------------------------------- loading


def check_quantize(quantize: str | None) -> None:
    """A known ``quantize`` value and an importable bitsandbytes (cheap: run it before any download)."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ConfigError(f"unknown quantization {quantize!r}", hint="use 8bit or 4bit")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise ModelError(
            f"{quantize} quantization needs bitsandbytes, which cannot be imported ({exc})",
            hint='install it with `pip install "holitom[quant]"`, or run without --quantize',
        ) from exc


def quantization_config(quantize: str | None, dtype: torch.dtype, skip_modules: Sequence[str]) -> Any:
    """bitsandbytes settings for the language model only: ``skip_modules`` (the family adapter's
    ``QUANTIZATION_SKIP``, module-name prefixes matched from the start of the name) stay unquantized."""
    check_quantize(quantize)
    if quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    skip = list(skip_modules)
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip
    )


def load_model(
    model: str,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str | None = None,
    offline: bool = False,
) -> VideoAdapter:
    """Load a checkpoint (hub id or local folder) as its family's :class:`VideoAdapter`.

    Raises ConfigError for bad device / dtype / quantize values and ModelError for checkpoints that cannot be
    found, downloaded, read or are of an unsupported architecture.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    check_quantize(quantize)
    path = resolve_checkpoint(model, revision=revision, offline=offline)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # transformers and safetensors cannot open such paths
        shown = str(path).encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
        raise ModelError(
            f"the model folder's path is not valid UTF-8: {shown}",
            hint="rename the folder (or the folders above it) to plain characters",
        ) from None
    family = read_model_type(path)
    module = family_module(family)
    quant = quantization_config(quantize, torch_dtype, module.QUANTIZATION_SKIP)
    return module.load(
        path, device=torch_device, dtype=torch_dtype, quantization=quant, quantize=quantize, name=model
    )
