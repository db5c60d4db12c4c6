"""Where code runs and where it keeps things: device, precision, seeds, files, workspace.

No module holds a global device: every function that computes takes a `device` argument,
and `pick_device("auto")` is how callers choose one. The one place for each of:

    pick_device     "auto" | "cpu" | "cuda" ... -> torch.device
    autocast        the library's mixed precision (bf16 autocast; fp16 on old GPUs)
    seed_everything, rng_state, set_rng_state   seeds, and the CPU + CUDA generator states
    atomic_write, atomic_folder   write a file / a folder so that a crash leaves the old one
    atomic_copy     give a finished file a second name, as atomically
    workspace_dir   the folder for data sets, feature caches and runs
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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


def rng_state() -> dict:
    """The torch generators' states: the CPU one and, when CUDA is in use, every GPU's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | torch.Tensor) -> None:
    """Restore `rng_state()`'s result (or a bare CPU state, as older checkpoints hold)."""
    if torch.is_tensor(state):
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def autocast(device: torch.device, precision: str = "auto", cpu: bool = True):
    """The mixed-precision context the library uses on `device`.

    precision "auto" or "bf16": bf16 autocast (on a CUDA GPU without bf16: fp16, which
    needs a `GradScaler` when training); "fp32": no autocast. `cpu=False`: no autocast on
    the CPU either (the trainer passes it for its decoder steps unless precision is
    "bf16"; see `TrainConfig.precision`).
    """
    if precision == "fp32" or device.type not in ("cpu", "cuda") or (
            device.type == "cpu" and not cpu):
        return nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """On CPU: subnormal floats (below 1.2e-38 in fp32) are read and written as zero
    inside the block (`torch.set_flush_denormal`, as TensorFlow does on CPU by default).

    A decoder on saturated inputs (the frozen random encoder of chapter 5) gets gradients
    and Adam moments that small, and x86 cores work on those many times slower: its
    steps measured 0.58 s without this and 0.21 s with it (2 threads, 30 steps, the fresh
    clone's cache). PyTorch has no getter for the flag: it is switched off again after
    the block, its default. Elsewhere (CUDA, or CPUs without the flag) nothing changes."""
    on = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _temporary(path: Path) -> Path:
    """The hidden temporary name next to `path` that `atomic_write`/`atomic_copy` rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator:
    """Open a temporary file next to `path`; on success flush, fsync, rename it to `path`.

    An exception (or Ctrl-C) inside the `with` leaves `path` as it was and no temporary
    file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """Make `path` a copy of the finished file `source`, replacing `path` atomically.

    A hard link where the file system has them: no bytes are written (a checkpoint is
    hundreds of MB), and since `atomic_write` always writes a new file and renames it,
    a later write of `source` leaves `path` as it was. Elsewhere, a copy (fsynced).
    """
    source, path = Path(source), Path(path)
    tmp = _temporary(path)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (some network and FAT file systems)
            shutil.copyfile(source, tmp)
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `folder`; on success fsync its files and
    rename it to `folder` (replacing an old one). A failure leaves no half-written folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
