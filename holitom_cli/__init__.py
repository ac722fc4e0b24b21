"""holitom: ask questions about videos with video LLMs, made fast by HoliTom token merging."""

__version__ = "0.1.0"
