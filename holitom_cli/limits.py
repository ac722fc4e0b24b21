"""Bounds on user input, in one place so that the checks, the ``--help`` texts and the docs agree.

Pure constants: no imports, so every layer (cli, pipeline, video) may use them.
"""

from __future__ import annotations

# Frames
MAX_FRAMES = 512  # hard cap on the number of sampled frames (``--frames`` / ``--max-frames``)
DEFAULT_FPS_MAX_FRAMES = 64  # cap applied to ``--fps`` sampling when ``--max-frames`` is not given

# Questions
MAX_QUESTION_CHARS = 20_000  # longer questions are refused before any work (the context bounds it too)
MAX_ASK_QUESTIONS = 1000  # questions in one ``ask`` call (more: use ``holitom batch``)

# Generation
MAX_NEW_TOKENS = 8192  # ``--max-new-tokens`` upper bound (the model's context bounds it too)
