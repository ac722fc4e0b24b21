"""The ``holitom`` command line (Typer + Rich). Importing it must not import torch, transformers or cv2."""
