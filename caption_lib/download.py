"""Getting Flickr8k (on Colab) and COCO 2014 (on a workstation or cluster): streamed, checked, resumable downloads and safe extraction.

Offline (this book's CI) nothing here runs against the internet; the tests use a local
HTTP server. A download:

1. streams into `NAME.part` with a tqdm bar, asking the server with an HTTP `Range`
   header to continue where an earlier, interrupted run stopped;
2. checks the SHA-256 of the finished file when one is known (a mismatch deletes the
   `.part` and raises `CaptionLibError`: a bad file never looks complete);
3. renames `.part` to `NAME` (atomic): a file with its final name is always complete.

`extract_zip` refuses archives whose members would land outside the target folder
(`../x`, `/etc/x`, `C:\\x`: "zip slip") before it writes anything.

A local mirror (a classroom server, or the loopback server of `tests/test_colab.py`):
with `CAPTION_LIB_MIRROR=http://host/folder` set, every archive of this module is fetched
from `http://host/folder/<its file name>` instead of its public address (same checksums).
`fetch_checkpoint` downloads a published trained model the same way (its SHA-256 is
required), for `Captioner.from_url`.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from caption_lib.errors import CaptionLibError


@dataclass(frozen=True)
class Source:
    """A file to download: its address and, when pinned, its SHA-256."""

    url: str
    sha256: str | None = None


# The well-known public mirror of Flickr8k (Jason Brownlee's GitHub releases) and Andrej
# Karpathy's split files (dataset_flickr8k.json, flickr30k, coco). Their SHA-256 could not
# be measured from this offline machine: they are None (not checked) until pinned.
FLICKR8K_IMAGES = Source(
    "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip")
FLICKR8K_TEXT = Source(
    "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip")
KARPATHY_SPLITS = Source(
    "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip")
# COCO 2014 images from the COCO project's own server (train2014: 82,783 images, ~13 GB;
# val2014: 40,504 images, ~6 GB); Karpathy's dataset_coco.json splits both (with its
# `filepath` train2014/val2014) into 113,287 train (incl. restval) / 5,000 val / 5,000 test.
COCO_TRAIN2014 = Source("http://images.cocodataset.org/zips/train2014.zip")
COCO_VAL2014 = Source("http://images.cocodataset.org/zips/val2014.zip")
MIRROR_ENV = "CAPTION_LIB_MIRROR"


def mirrored(url: str) -> str:
    """`url`, or its file name under `$CAPTION_LIB_MIRROR` when that is set."""
    mirror = os.environ.get(MIRROR_ENV, "").rstrip("/")
    return f"{mirror}/{url.rsplit('/', 1)[-1]}" if mirror else url


def sha256_of(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: str | Path, sha256: str | None = None, *, timeout: float = 60.0,
             chunk_size: int = 1 << 16, progress: bool = True) -> Path:
    """Download `url` to `dest` (resuming `dest.part`), check `sha256`, rename; return `dest`.

    An existing `dest` is kept when its checksum matches (or none is given).
    """
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status == 206:
                mode = "ab"
            else:  # the server ignored the Range: start again
                mode, have = "wb", 0
            size = response.headers.get("Content-Length")
            total = have + int(size) if size is not None else None
            with open(part, mode) as f, tqdm(total=total, initial=have, unit="B",
                                             unit_scale=True, desc=dest.name,
                                             disable=not progress) as bar:
                while chunk := response.read(chunk_size):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        if not (err.code == 416 and have):  # 416: the .part is already whole
            raise CaptionLibError(f"{url}: download failed (HTTP {err.code} {err.reason})"
                                  ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CaptionLibError(f"{url}: download failed ({reason}); run again to resume "
                              f"from {part}") from None
    if sha256 is not None:
        got = sha256_of(part)
        if got != sha256:
            part.unlink()
            raise CaptionLibError(f"{url}: checksum mismatch (sha256 {got}, expected {sha256});"
                                  " the partial file was deleted")
    os.replace(part, dest)
    return dest


def _unsafe(name: str) -> bool:
    """True when a zip member name could escape the folder it is extracted into."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return (posix.is_absolute() or windows.is_absolute() or bool(windows.drive)
            or name.startswith(("/", "\\")) or ".." in posix.parts or ".." in windows.parts)


def extract_zip(archive: str | Path, target: str | Path, members: list[str] | None = None
                ) -> Path:
    """Extract `archive` (or only `members`) into `target`; refuse escaping member names.

    macOS metadata (`__MACOSX/`) is left out. Every name is checked before anything is
    written, so a rejected archive leaves `target` untouched.
    """
    archive, target = Path(archive), Path(target)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if not n.startswith("__MACOSX/")]
            if members is not None:  # by name, wherever they are in the archive
                names = [n for n in names if PurePosixPath(n).name in members]
                missing = sorted(set(members) - {PurePosixPath(n).name for n in names})
                if missing:
                    raise CaptionLibError(f"{archive}: no member {missing[0]!r}")
            root = target.resolve()
            for name in names:
                if _unsafe(name) or not (root / name).resolve().is_relative_to(root):
                    raise CaptionLibError(f"{archive}: member {name!r} would be written "
                                          f"outside {target}; refusing to extract")
            target.mkdir(parents=True, exist_ok=True)
            for name in names:
                zf.extract(name, target)
    except zipfile.BadZipFile as err:
        raise CaptionLibError(f"{archive}: not a zip file ({err})") from None
    return target


def prepare_flickr8k(root: str | Path | None = None, karpathy_splits: bool = True,
                     progress: bool = True) -> Path:
    """Download and extract Flickr8k (images, captions and, by default, Karpathy's split
    file) into `root` (default: `workspace_dir()/flickr8k`); return that folder.

    `load_dataset(folder)` then reads `dataset_flickr8k.json` (Karpathy's splits) or, without
    it, `Flickr8k.token.txt` with the official split lists. Runs again cheaply: finished
    steps leave a marker and are skipped.
    """
    from caption_lib.runtime import workspace_dir

    root = Path(root) if root is not None else workspace_dir() / "flickr8k"
    steps = [(FLICKR8K_TEXT, None), (FLICKR8K_IMAGES, None)]
    if karpathy_splits:
        steps.append((KARPATHY_SPLITS, ["dataset_flickr8k.json"]))
    return _fetch(root, steps, progress)


def prepare_coco(root: str | Path | None = None, progress: bool = True) -> Path:
    """Download and extract COCO 2014 (train2014/, val2014/, ~19 GB of zips, ~20 GB
    extracted) and Karpathy's `dataset_coco.json` into `root` (default:
    `workspace_dir()/coco`); return that folder, which `caption-lib train --data` reads.

    On a cluster, run this once on a node with internet access into a shared folder.
    Finished steps leave a marker and are skipped; interrupted downloads resume.
    """
    from caption_lib.runtime import workspace_dir

    root = Path(root) if root is not None else workspace_dir() / "coco"
    steps = [(KARPATHY_SPLITS, ["dataset_coco.json"]), (COCO_VAL2014, None),
             (COCO_TRAIN2014, None)]
    return _fetch(root, steps, progress)


def _fetch(root: Path, steps: list[tuple[Source, list[str] | None]], progress: bool) -> Path:
    """Download and extract each (source, members) into `root`, once (marker files)."""
    for source, members in steps:
        name = source.url.rsplit("/", 1)[-1]
        marker = root / f".{name}.extracted"
        if marker.is_file():
            continue
        archive = download(mirrored(source.url), root / "downloads" / name, source.sha256,
                           progress=progress)
        extract_zip(archive, root, members)
        for member in members or []:  # e.g. dataset_flickr8k.json inside a folder
            found = sorted(root.rglob(member))
            if found and not (root / member).is_file():
                os.replace(found[0], root / member)
        marker.write_text("ok\n")
    return root


def fetch_checkpoint(url: str, sha256: str, folder: str | Path | None = None,
                     progress: bool = True) -> Path:
    """Download a published checkpoint (`.pt`) once into `folder` (default:
    `workspace_dir()/checkpoints`), checked against `sha256`; return its path.

    The SHA-256 is required: a trained model is code-adjacent data, and a file that is not
    the one published must never be loaded. A mismatch deletes the download and raises
    `CaptionLibError` (one line).
    """
    import re

    from caption_lib.runtime import workspace_dir

    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise CaptionLibError(f"{url}: a checkpoint needs its SHA-256 (64 hex digits), "
                              f"got {sha256!r}")
    folder = Path(folder) if folder is not None else workspace_dir() / "checkpoints"
    name = url.rsplit("/", 1)[-1].split("?")[0] or "checkpoint.pt"
    # the hash in the name: another published file never reuses a stale download
    dest = folder / f"{sha256.lower()[:12]}-{name}"
    return download(url, dest, sha256.lower(), progress=progress)
