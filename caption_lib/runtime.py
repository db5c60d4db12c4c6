"""Where code runs and where it keeps things: device choice, seeds, the workspace folder.

No module holds a global device: every function that computes takes a `device` argument,
and `pick_device("auto")` is how callers choose one.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from caption_lib.errors import CaptionLibError

WORKSPACE_ENV = "CAPTION_LIB_HOME"


def pick_device(name: str = "auto") -> torch.device:
    """Return the device for `name` ("auto", "cpu", "cuda", "cuda:1", "mps").

    "auto" takes CUDA when available, else CPU (MPS is only used when asked for).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CaptionLibError(f"unknown device {name!r} (use auto, cpu or cuda)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaptionLibError(f"device {name!r} asked for, but this machine has no CUDA GPU")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def on_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def workspace_dir() -> Path:
    """The folder for data sets, feature caches and runs.

    `$CAPTION_LIB_HOME` when set; else `data/` of the repository when the package is an
    editable checkout (so notebooks, tests and the CLI share one cache); else
    `~/.cache/caption_lib`.
    """
    if os.environ.get(WORKSPACE_ENV):
        root = Path(os.environ[WORKSPACE_ENV]).expanduser()
    else:
        repo = Path(__file__).resolve().parents[1]
        if (repo / "pyproject.toml").is_file() and (repo / "notebooks").is_dir():
            root = repo / "data"
        else:
            root = Path.home() / ".cache" / "caption_lib"
    root.mkdir(parents=True, exist_ok=True)
    return root
