"""Option types shared by ``ask``, ``batch`` and ``inspect``.

Each option is an ``Annotated`` type so that every command declares it the same way, with the same help text
and the same help panel. Defaults of ``None`` mean "not given": :mod:`holitom_cli.cli.settings` turns the raw
values into a validated ``HoliTomConfig`` / ``SamplingOptions`` and reports conflicts.

This module must stay light: it imports only typer (no torch, transformers or cv2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from holitom_cli.limits import DEFAULT_FPS_MAX_FRAMES, MAX_FRAMES, MAX_NEW_TOKENS, MAX_QUESTION_CHARS

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
DEFAULT_FRAMES = 32
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_REPEATS = 3

PANEL_MODEL = "Model"
PANEL_COMPRESSION = "Compression"
PANEL_FRAMES = "Frames"
PANEL_GENERATION = "Generation"
PANEL_OUTPUT = "Output"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
QuantizeMode = Literal["8bit", "4bit"]

# ---------------------------------------------------------------- arguments

VideoArg = Annotated[
    Path,
    typer.Argument(help="Video file to read (mp4, avi, mkv, webm, mov, ...).", show_default=False),
]
QuestionArg = Annotated[
    str | None,
    typer.Argument(
        help=f"Question to ask about the video, at most {MAX_QUESTION_CHARS:,} characters (or use -q).",
        show_default=False,
    ),
]
# ``-q`` means ``--question`` in every command (``batch`` repeats it); ``ask`` takes one, as an alternative to
# the positional QUESTION.
AskQuestionOpt = Annotated[
    str | None,
    typer.Option(
        "--question",
        "-q",
        help="The question, instead of the QUESTION argument (handy when it starts with '-').",
        show_default=False,
    ),
]

# ---------------------------------------------------------------- model

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Hugging Face hub id or local checkpoint directory.",
        rich_help_panel=PANEL_MODEL,
    ),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        help="Hub revision (branch, tag or commit).",
        rich_help_panel=PANEL_MODEL,
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="Device: auto, cpu, cuda, cuda:1, mps.", rich_help_panel=PANEL_MODEL),
]
DtypeOpt = Annotated[
    Dtype,
    typer.Option(
        "--dtype",
        help="Weight dtype (auto: bfloat16 where supported, else float32).",
        rich_help_panel=PANEL_MODEL,
    ),
]
QuantizeOpt = Annotated[
    QuantizeMode | None,
    typer.Option(
        "--quantize",
        help="Quantize the language model with bitsandbytes (needs the 'quant' extra).",
        rich_help_panel=PANEL_MODEL,
        show_default=False,
    ),
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline", help="Never contact the hub; use the local cache only.", rich_help_panel=PANEL_MODEL
    ),
]

# ---------------------------------------------------------------- compression

PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset",
        "-p",
        help="Preset: fastest, fast, balanced, accurate (see 'holitom presets'). (default: balanced)",
        rich_help_panel=PANEL_COMPRESSION,
        show_default=False,
    ),
]
RetainRatioOpt = Annotated[
    float | None,
    typer.Option(
        "--retain-ratio",
        help="Fraction of visual tokens kept before the LLM, in (0, 1]. Overrides the preset.",
        rich_help_panel=PANEL_COMPRESSION,
        show_default=False,
    ),
]
TauOpt = Annotated[
    float | None,
    typer.Option(
        "--tau",
        help="Similarity threshold of temporal merging, in [0, 1] (0.8 typical, 1: off). "
        "Overrides the preset.",
        rich_help_panel=PANEL_COMPRESSION,
        show_default=False,
    ),
]
InnerLayerOpt = Annotated[
    int | None,
    typer.Option(
        "--inner-layer",
        help="LLM layer where the inner merge happens (default: automatic, 18 of 28 layers).",
        rich_help_panel=PANEL_COMPRESSION,
        show_default=False,
    ),
]
InnerPruneRatioOpt = Annotated[
    float | None,
    typer.Option(
        "--inner-prune-ratio",
        help="Fraction of visual tokens merged away inside the LLM, in [0, 1). Overrides the preset.",
        rich_help_panel=PANEL_COMPRESSION,
        show_default=False,
    ),
]
NoInnerOpt = Annotated[
    bool,
    typer.Option(
        "--no-inner", help="Skip the inner-LLM merge (HoliTom 'w/o M').", rich_help_panel=PANEL_COMPRESSION
    ),
]
NoCompressOpt = Annotated[
    bool,
    typer.Option(
        "--no-compress",
        help="Run the unmodified model (no token merging).",
        rich_help_panel=PANEL_COMPRESSION,
    ),
]
CompareBaselineOpt = Annotated[
    bool,
    typer.Option(
        "--compare-baseline",
        help="Also answer without compression on the same frames and compare speed (see --repeats).",
        rich_help_panel=PANEL_COMPRESSION,
    ),
]
RepeatsOpt = Annotated[
    int,
    typer.Option(
        "--repeats",
        help="With --compare-baseline: runs of each side, interleaved (full model, HoliTom, ...); the "
        "speed-ups are the median with the min-max spread.",
        min=1,
        rich_help_panel=PANEL_COMPRESSION,
    ),
]

# ---------------------------------------------------------------- frames

FramesOpt = Annotated[
    int | None,
    typer.Option(
        "--frames",
        help=f"Number of frames sampled uniformly, at most {MAX_FRAMES}. (default: {DEFAULT_FRAMES})",
        min=1,
        rich_help_panel=PANEL_FRAMES,
        show_default=False,
    ),
]
FpsOpt = Annotated[
    float | None,
    typer.Option(
        "--fps",
        help=(
            "Sample this many frames per second instead of a fixed count "
            f"(at most --max-frames, default {DEFAULT_FPS_MAX_FRAMES})."
        ),
        rich_help_panel=PANEL_FRAMES,
        show_default=False,
    ),
]
MaxFramesOpt = Annotated[
    int | None,
    typer.Option(
        "--max-frames",
        help=f"With --fps: cap on the number of frames, at most {MAX_FRAMES} (resampled uniformly if over).",
        min=1,
        rich_help_panel=PANEL_FRAMES,
        show_default=False,
    ),
]

# ---------------------------------------------------------------- generation

MaxNewTokensOpt = Annotated[
    int,
    typer.Option(
        "--max-new-tokens",
        help=f"Maximum length of the answer in tokens, at most {MAX_NEW_TOKENS} (and the model's context).",
        min=1,
        rich_help_panel=PANEL_GENERATION,
    ),
]
TemperatureOpt = Annotated[
    float,
    typer.Option(
        "--temperature",
        help="Sampling temperature; 0 means greedy.",
        min=0.0,
        rich_help_panel=PANEL_GENERATION,
    ),
]
TopPOpt = Annotated[
    float | None,
    typer.Option(
        "--top-p",
        help="Nucleus sampling: keep the most likely tokens up to this probability, in (0, 1]. "
        "Needs --temperature > 0.",
        rich_help_panel=PANEL_GENERATION,
        show_default=False,
    ),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed",
        help="Seed of the sampler (an integer >= 0), for reproducible answers. Needs --temperature > 0.",
        rich_help_panel=PANEL_GENERATION,
        show_default=False,
    ),
]

# ---------------------------------------------------------------- output

JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON object per question on stdout (one per line) and nothing else.",
        rich_help_panel=PANEL_OUTPUT,
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="More detail in the report (settings in effect, KV cache).",
        rich_help_panel=PANEL_OUTPUT,
    ),
]
# No short form: -q means --question in every command.
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", help="No report or progress on stderr.", rich_help_panel=PANEL_OUTPUT),
]
QuietLongOpt = QuietOpt  # the name batch imports
ExplainOpt = Annotated[
    Path | None,
    typer.Option(
        "--explain",
        help="Also save a picture of what was merged (PNG, or GIF if the name ends in .gif).",
        rich_help_panel=PANEL_OUTPUT,
        show_default=False,
        dir_okay=False,
    ),
]


def generation_options(
    max_new_tokens: int, temperature: float, top_p: float | None = None, seed: int | None = None
):
    """``GenerationOptions`` from the command-line values; ConfigError (one line + hint) when out of range.

    ``--top-p`` and ``--seed`` only change sampling, so they are refused with greedy decoding (temperature 0)
    rather than silently ignored.
    """
    from holitom_cli.errors import ConfigError
    from holitom_cli.pipeline import GenerationOptions

    if not temperature:
        given = [name for name, value in (("--top-p", top_p), ("--seed", seed)) if value is not None]
        if given:
            raise ConfigError(
                f"{' and '.join(given)} only apply when sampling, but --temperature is 0 (greedy)",
                hint="add --temperature, e.g. --temperature 0.7, or drop " + " and ".join(given),
            )
    return GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


# ---------------------------------------------------------------- video cache (docs/cache.md)

PANEL_CACHE = "Video cache"

NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        help="Do not read or write the video cache: decode the video and run the vision tower again.",
        rich_help_panel=PANEL_CACHE,
    ),
]
CacheSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--cache-size",
        help="Cap on the video cache's size, e.g. 10GB, 500MB, 2GiB; least recently used videos are evicted "
        "beyond it. (default: 10GB)",
        rich_help_panel=PANEL_CACHE,
        show_default=False,
    ),
]
CacheDirOpt = Annotated[
    str | None,
    typer.Option(
        "--cache-dir",
        help="Folder of the video cache (default: $HOLITOM_CACHE, else ~/.cache/holitom).",
        rich_help_panel=PANEL_CACHE,
        show_default=False,
    ),
]
