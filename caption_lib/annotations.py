"""Caption annotations in, `Record`s out: one reader per format, and safe image loading.

A captioning data set is a set of images, each with several reference captions (5 for
Flickr8k/30k and shapes), and a split (train / val / test) made over *images*, so that no
test image is seen in training under another caption. Three real formats exist:

- Karpathy JSON (`dataset_flickr8k.json`, flickr30k, coco; Karpathy & Fei-Fei 2015): images
  with `filename` [+ `filepath`], `split` in train/val/test/restval and `sentences` with
  `raw` and `tokens`. `restval` (COCO) is folded into train unless `restval_to_train=False`.
- the original Flickr8k text release: `Flickr8k.token.txt` lines `IMAGE.jpg#N<TAB>caption`
  and the split lists `Flickr_8k.{train,dev,test}Images.txt` next to it (dev -> "val").
- the Kaggle Flickr8k `captions.txt`: CSV with header `image,caption` (quoted captions).

`read_annotations` detects the format; all produce the same `Record`s. Bad input:

| problem | what happens |
|---|---|
| unknown format, unreadable file, malformed JSON / line / CSV row | error (file:line) |
| unknown split name, image in two split lists | error (file:line) |
| duplicate image (JSON), duplicate `IMAGE#N` (token file) | error (file:line) |
| empty or whitespace caption | skipped, counted (`empty_caption`) |
| repeated identical caption of an image | skipped, counted (`duplicate_caption`) |
| image left with no caption | skipped, counted (`no_captions`) |
| Flickr8k image in no split list | skipped, counted (`unsplit`) |
| missing image file | counted by `find_missing_images` / `inspect`; error when loaded |
| corrupt / zero-byte / truncated image, decompression bomb | error (`load_image`) |
| grayscale, RGBA, CMYK, palette, 16-bit image | converted to RGB (`load_image`) |
| photo with an EXIF orientation (phones) | turned upright (`load_image`) |
| HEIC/HEIF or another format PIL cannot read | error naming the file and the format |

Skips are counted into `skipped` (a `Counter` the caller passes) and reported with a
warning; nothing is dropped silently. Without split lists (Kaggle), images are split by a
hash of their file name: 75% train, 12.5% val, 12.5% test, the proportions of Flickr8k.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from caption_lib.errors import CaptionLibError

SPLITS = ("train", "val", "test")
_TOKEN_LINE = re.compile(r"^(?P<image>[^\t#]+)#(?P<n>\d+)\t(?P<caption>.*)$")
_IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images")


@dataclass
class Record:
    """One image: its file, its reference captions, its split and (shapes only) objects."""

    image: Path
    captions: list[str]
    split: str
    image_id: str
    objects: list[dict] | None = None


# ---------------------------------------------------------------- readers --------------


def read_annotations(path: str | Path, images_dir: str | Path | None = None, *,
                     restval_to_train: bool = True, skipped: Counter | None = None
                     ) -> list[Record]:
    """Read any of the three formats (detected from the file) into `Record`s.

    `images_dir` is where the image files are (default: a folder named `images`, `Images`
    or `Flicker8k_Dataset` next to the file or one level up, else the file's folder).
    Counted skips are added to `skipped` when given and reported with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionLibError(f"{path}: annotation file not found")
    images = Path(images_dir) if images_dir is not None else _default_images_dir(path.parent)
    counts: Counter = Counter()
    kind = detect_format(path)
    if kind == "karpathy":
        records = _read_karpathy(path, images, restval_to_train, counts)
    elif kind == "flickr8k":
        records = _read_flickr8k(path, images, counts)
    else:
        records = _read_kaggle(path, images, counts)
    if counts:
        what = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        warnings.warn(f"{path}: skipped {what}", stacklevel=2)
    if skipped is not None:
        skipped.update(counts)
    if not records:
        raise CaptionLibError(f"{path}: no image with a caption found")
    return records


def detect_format(path: Path) -> str:
    """'karpathy', 'flickr8k' (token file) or 'kaggle' (captions.txt)."""
    first = _read_text(path).lstrip()[:200]
    line = first.splitlines()[0] if first else ""
    if first.startswith("{"):
        return "karpathy"
    if line.replace(" ", "").lower().startswith("image,caption"):
        return "kaggle"
    if _TOKEN_LINE.match(line):
        return "flickr8k"
    raise CaptionLibError(f"{path}:1: unknown annotation format (expected Karpathy JSON, "
                          "Flickr8k.token.txt or a captions.txt with header 'image,caption')")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise CaptionLibError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise CaptionLibError(f"{path}: cannot read ({err.strerror})") from None


def _default_images_dir(folder: Path) -> Path:
    for base in (folder, folder.parent):
        for name in _IMAGE_DIRS:
            if (base / name).is_dir():
                return base / name
    return folder


def _read_karpathy(path: Path, images: Path, restval_to_train: bool, counts: Counter
                   ) -> list[Record]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise CaptionLibError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CaptionLibError(f"{path}: no 'images' list (not a Karpathy split file)")
    records, seen = [], set()
    for i, entry in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise CaptionLibError(f"{where}: no 'filename'")
        split = entry.get("split")
        if split == "restval" and restval_to_train:
            split = "train"
        if split not in SPLITS + ("restval",):
            raise CaptionLibError(f"{where}: unknown split {split!r} (train, val, test, restval)")
        rel = Path(entry.get("filepath") or "") / entry["filename"]
        if str(rel) in seen:
            raise CaptionLibError(f"{where}: duplicate image {rel}")
        seen.add(str(rel))
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise CaptionLibError(f"{where}: no 'sentences' list")
        texts = []
        for k, s in enumerate(sentences):
            if not isinstance(s, dict) or not ("raw" in s or "tokens" in s):
                raise CaptionLibError(f"{where}: sentences[{k}] has neither 'raw' nor 'tokens'")
            texts.append(s["raw"] if isinstance(s.get("raw"), str) else " ".join(s["tokens"]))
        captions = _clean(texts, counts)
        if captions:
            records.append(Record(images / rel, captions, split, str(rel), entry.get("objects")))
    return records


def _clean(texts: list[str], counts: Counter) -> list[str]:
    """Strip captions; count and drop empty and repeated ones; count captionless images."""
    out: list[str] = []
    for t in texts:
        t = " ".join(t.split())
        if not t:
            counts["empty_caption"] += 1
        elif t in out:
            counts["duplicate_caption"] += 1
        else:
            out.append(t)
    if not out:
        counts["no_captions"] += 1
    return out


def _read_flickr8k(path: Path, images: Path, counts: Counter) -> list[Record]:
    captions: dict[str, list[str]] = {}
    seen: set[str] = set()
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        m = _TOKEN_LINE.match(line)
        if not m:
            raise CaptionLibError(f"{path}:{number}: malformed line (want IMAGE.jpg#N<TAB>caption)")
        key = f"{m['image']}#{m['n']}"
        if key in seen:
            raise CaptionLibError(f"{path}:{number}: duplicate caption id {key}")
        seen.add(key)
        captions.setdefault(m["image"], []).append(m["caption"])
    return _records(captions, _split_lists(path.parent), images, counts)


def _read_kaggle(path: Path, images: Path, counts: Counter) -> list[Record]:
    captions: dict[str, list[str]] = {}
    reader = csv.reader(_read_text(path).splitlines())
    next(reader)  # the header
    for row in reader:
        if not row or not any(f.strip() for f in row):
            continue
        if len(row) < 2 or not row[0].strip():
            raise CaptionLibError(f"{path}:{reader.line_num}: malformed row (want image,caption)")
        # an unquoted comma inside a caption splits it: join the pieces back
        captions.setdefault(row[0].strip(), []).append(",".join(row[1:]))
    return _records(captions, _split_lists(path.parent), images, counts)


def _split_lists(folder: Path) -> dict[str, str] | None:
    """image -> split from Flickr_8k.{train,dev,test}Images.txt, or None without them."""
    files = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
             "test": "Flickr_8k.testImages.txt"}
    if not any((folder / f).is_file() for f in files.values()):
        return None
    split_of: dict[str, str] = {}
    for split, name in files.items():
        if not (folder / name).is_file():
            raise CaptionLibError(f"{folder / name}: split list missing (the other lists exist)")
        for number, line in enumerate(_read_text(folder / name).splitlines(), start=1):
            image = line.strip()
            if image and image in split_of:
                raise CaptionLibError(f"{folder / name}:{number}: {image} is already in "
                                      f"the {split_of[image]} split")
            if image:
                split_of[image] = split
    return split_of


def hash_split(name: str) -> str:
    """A split from the image's file name alone: 75% train, 12.5% val, 12.5% test."""
    u = int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:8], 16) / 16**8
    return "train" if u < 0.75 else "val" if u < 0.875 else "test"


def _records(captions: dict[str, list[str]], split_of: dict[str, str] | None, images: Path,
             counts: Counter) -> list[Record]:
    records = []
    for name, texts in captions.items():
        split = hash_split(name) if split_of is None else split_of.get(name)
        if split is None:
            counts["unsplit"] += 1
            continue
        kept = _clean(texts, counts)
        if kept:
            records.append(Record(images / name, kept, split, name))
    return records


# ---------------------------------------------------------------- folders and splits ---


def find_annotations(data_dir: Path) -> Path:
    """The annotation file of a data set folder (shapes output, Flickr8k, Kaggle)."""
    for pattern in ("dataset_*.json", "Flickr8k.token.txt", "*/Flickr8k.token.txt",
                    "captions.txt", "*/captions.txt"):
        found = sorted(data_dir.glob(pattern))
        if len(found) > 1:
            raise CaptionLibError(f"{data_dir}: several annotation files: "
                                  + ", ".join(p.name for p in found))
        if found:
            return found[0]
    raise CaptionLibError(f"{data_dir}: no annotation file (dataset_*.json, "
                          "Flickr8k.token.txt or captions.txt)")


def load_dataset(data_dir: str | Path, images_dir: str | Path | None = None, *,
                 restval_to_train: bool = True, skipped: Counter | None = None
                 ) -> list[Record]:
    """All records of a data set folder (or of an annotation file)."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        path = data_dir
    elif data_dir.is_dir():
        path = find_annotations(data_dir)
    else:
        raise CaptionLibError(f"{data_dir}: data set folder not found")
    return read_annotations(path, images_dir, restval_to_train=restval_to_train,
                            skipped=skipped)


def split_records(records: list[Record], split: str) -> list[Record]:
    """The records of one split ('train', 'val', 'test' or 'restval')."""
    if split not in SPLITS + ("restval",):
        raise CaptionLibError(f"unknown split {split!r} (train, val, test or restval)")
    return [r for r in records if r.split == split]


def find_missing_images(records: list[Record]) -> list[Path]:
    """Image files the records name that do not exist."""
    return [r.image for r in records if not r.image.is_file()]


# ---------------------------------------------------------------- images ---------------


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, upright, whatever its mode; CaptionLibError naming the file
    if broken.

    A phone photo stores its pixels as the sensor saw them and its rotation in the EXIF
    Orientation tag: it is applied (`ImageOps.exif_transpose`), so a portrait photo is
    seen upright, as a photo viewer shows it. Grayscale, palette and CMYK images are
    converted; transparent ones are put on white; 16-bit and float images are scaled to
    8 bits (not clipped).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise CaptionLibError(f"{path}: image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise CaptionLibError(f"{path}: image too large ({err})") from None
    except UnidentifiedImageError:
        kind = _unreadable_kind(path)
        raise CaptionLibError(f"{path}: not an image PIL can read ({kind}); "
                              "convert it to JPEG or PNG") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise CaptionLibError(f"{path}: broken image ({err})") from None
    return to_rgb(image)


def _unreadable_kind(path: Path) -> str:
    """What a file PIL cannot open looks like: HEIC/AVIF (phones), empty, or unknown."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return "unreadable file"
    if not head:
        return "empty file"
    if head[4:8] == b"ftyp":  # ISO base media: HEIC/HEIF (iPhone photos), AVIF
        brand = head[8:12].decode("ascii", "replace").strip()
        return {"heic": "HEIC photo", "heix": "HEIC photo", "mif1": "HEIF image",
                "avif": "AVIF image"}.get(brand, f"ISO media file, brand {brand!r}")
    return "unknown format"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see `load_image`)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)  # (H, W)
        if pixels.max(initial=0) > 255:
            pixels = pixels / 257.0  # 16-bit range to 8-bit
        grey = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
