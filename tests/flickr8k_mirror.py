"""A tiny Flickr8k in the exact layout of the public archives, with learnable captions.

`build_mirror(folder)` writes the three archives `caption_lib.download.prepare_flickr8k`
fetches, shaped like the real ones:

- `Flickr8k_Dataset.zip`: `Flicker8k_Dataset/NNN_hash.jpg` (the folder name misspelt, as
  in the real archive), JPEGs of 500x375 and 375x500 pixels, plus macOS `__MACOSX/._*`
  resource-fork entries;
- `Flickr8k_text.zip`: `Flickr8k.token.txt` (`IMAGE.jpg#N<TAB>caption`, with one line
  naming `IMAGE.jpg.1`, an image that does not exist, as the real file has),
  `Flickr8k.lemma.token.txt`, the three split lists, `CrowdFlowerAnnotations.txt`,
  `ExpertAnnotations.txt`, `readme.txt` and `__MACOSX/` entries;
- `caption_datasets.zip` (Karpathy's): `dataset_flickr8k.json`, `dataset_flickr30k.json`
  and `dataset_coco.json`, sentences with `raw` (capitalised, " ." at the end) and
  lower-case `tokens`; one image repeats a caption, as real data does.

The pictures are scenes of caption_lib's shapes generator and their captions describe
them, so a model can learn them from the pixels; there is no per-object ground truth in
the JSON, exactly as for the real Flickr8k (semantic F1 and grounding are "n/a").

`plant_imagenet_weights(torch_home, pictures)` writes a ResNet-50 state dict under
torchvision's file name for `ResNet50_Weights.DEFAULT` into `TORCH_HOME/hub/checkpoints/`,
so that `resnet50(weights="DEFAULT")` loads it without a download. Its weights are random
(seeded), not ImageNet's: the check exercises the pretrained code path, not pretrained
quality.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from caption_lib.shapes import COLOURS, HALF_SIZE, SHAPES, _place, _render, captions_for

SIZES = [(500, 375)] * 6 + [(375, 500)]  # Flickr photos: mostly landscape
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)


def _name(i: int) -> str:
    digest = hashlib.sha1(f"image{i}".encode()).hexdigest()[:10]
    return f"{1000268201 + 7919 * i}_{digest}.jpg"


def _one_object(rng: np.random.Generator) -> list[dict]:
    """One object of random shape, colour and size at a random place (224 px)."""
    obj = {"shape": SHAPES[int(rng.integers(len(SHAPES)))],
           "colour": COLOURS[int(rng.integers(len(COLOURS)))],
           "size": ("small", "big")[int(rng.integers(2))]}
    r = HALF_SIZE[obj["size"]]
    cx, cy = (int(v) for v in rng.integers(r + 2, 224 - r - 2, size=2))
    return [{**obj, "box": [cx - r, cy - r, cx + r, cy + r]}]


def _picture(i: int, seed: int, max_objects: int) -> tuple[bytes, list[str]]:
    """A JPEG of a shapes scene and its 5 captions."""
    rng = np.random.default_rng([seed, i])
    objects = _one_object(rng) if max_objects == 1 else _place(rng, 224)
    image = _render(objects, rng, 224).resize(SIZES[i % len(SIZES)], Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), captions_for(objects, rng, 224)


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _raw(caption: str) -> str:
    return caption[0].upper() + caption[1:] + " ."


def build_mirror(folder: Path, n_train: int = 60, n_val: int = 12, n_test: int = 12,
                 seed: int = 7, max_objects: int = 1) -> dict[str, int]:
    """Write the three archives into `folder`; return counts of what they hold.

    `max_objects`: 1 draws one object per picture (captions a small model learns in a
    few hundred steps); 3 draws scenes as the shapes data set does.
    """
    folder.mkdir(parents=True, exist_ok=True)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    images: dict[str, bytes] = {"Flicker8k_Dataset/": b""}
    tokens, karpathy, lists = [], [], {"train": [], "val": [], "test": []}
    for i, split in enumerate(splits):
        name = _name(i)
        jpeg, captions = _picture(i, seed, max_objects)
        if i == 0:  # a repeated reference: the readers keep it once
            captions = captions[:4] + [captions[0]]
        images[f"Flicker8k_Dataset/{name}"] = jpeg
        if i % 5 == 0:
            images[f"__MACOSX/Flicker8k_Dataset/._{name}"] = APPLEDOUBLE
        tokens += [f"{name}#{k}\t{_raw(c)}" for k, c in enumerate(captions)]
        lists[split].append(name)
        karpathy.append({"filename": name, "imgid": i, "split": split,
                         "sentids": list(range(5 * i, 5 * i + 5)),
                         "sentences": [{"raw": _raw(c), "tokens": c.split(), "imgid": i,
                                        "sentid": 5 * i + k} for k, c in enumerate(captions)]})
    # the real token file names one image "....jpg.1", which is in no split list and no zip
    ghost = _name(0) + ".1"
    tokens[5:5] = [f"{ghost}#{k}\tA picture that is not in the archive ." for k in range(5)]
    lemma = [line.lower() for line in tokens]
    text = {
        "Flickr8k.token.txt": "\n".join(tokens) + "\n",
        "Flickr8k.lemma.token.txt": "\n".join(lemma) + "\n",
        "Flickr_8k.trainImages.txt": "\n".join(lists["train"]) + "\n",
        "Flickr_8k.devImages.txt": "\n".join(lists["val"]) + "\n",
        "Flickr_8k.testImages.txt": "\n".join(lists["test"]) + "\n",
        "CrowdFlowerAnnotations.txt": f"{_name(0)}\t{_name(0)}#0\t1.0\t3\t0\n",
        "ExpertAnnotations.txt": f"{_name(0)}\t{_name(0)}#0\t4\t4\t4\n",
        "readme.txt": "A tiny stand-in for Flickr8k (tests/flickr8k_mirror.py).\n",
    }
    text_zip = {k: v.encode() for k, v in text.items()}
    text_zip.update({f"__MACOSX/._{k}": APPLEDOUBLE for k in text})
    splits_zip = {
        "dataset_flickr8k.json": json.dumps({"images": karpathy, "dataset": "flickr8k"}),
        "dataset_flickr30k.json": json.dumps({"images": [], "dataset": "flickr30k"}),
        "dataset_coco.json": json.dumps({"images": [], "dataset": "coco"}),
    }
    (folder / "Flickr8k_Dataset.zip").write_bytes(_zip(images))
    (folder / "Flickr8k_text.zip").write_bytes(_zip(text_zip))
    (folder / "caption_datasets.zip").write_bytes(
        _zip({k: v.encode() for k, v in splits_zip.items()}))
    return {"images": len(splits), "captions": sum(len(e["sentences"]) for e in karpathy),
            "repeated_captions": 1, **{s: len(v) for s, v in lists.items()}}


def mirror_images(folder: Path, n: int) -> list[Image.Image]:
    """The first `n` pictures of the mirror's image archive."""
    with zipfile.ZipFile(folder / "Flickr8k_Dataset.zip") as zf:
        names = [m for m in zf.namelist() if m.startswith("Flicker8k_Dataset/") and
                 m.endswith(".jpg")][:n]
        return [Image.open(io.BytesIO(zf.read(m))).convert("RGB") for m in names]


def plant_imagenet_weights(torch_home: Path, calibration: list[Image.Image], seed: int = 0
                           ) -> Path:
    """Random ResNet-50 weights under the file name of `ResNet50_Weights.DEFAULT`.

    The convolution weights are torchvision's random initialisation (seeded); only the
    BatchNorm running statistics are measured, on the `calibration` pictures, as trained
    weights' statistics are on their training images. Left at their initial values (mean
    0, variance 1) the frozen features grow to magnitudes that saturate the decoder, as
    the Training chapter shows; ImageNet's weights do not have that problem.
    """
    import torch
    from torchvision.models import ResNet50_Weights, resnet50

    from caption_lib.encoder import image_transform

    name = ResNet50_Weights.DEFAULT.url.rsplit("/", 1)[-1]  # resnet50-11ad3fa6.pth
    path = torch_home / "hub" / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 12345)  # not the seed of the library's random fallback
        net = resnet50(weights=None)
    transform = image_transform()
    batch = torch.stack([transform(image) for image in calibration])  # (N, 3, 224, 224)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batch below
    net.train()
    with torch.no_grad():
        net(batch)
    torch.save(net.state_dict(), path)
    return path
