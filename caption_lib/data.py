"""The data layer: records and vocabulary (re-exported here), datasets, collate, `inspect`.

`CaptionDataset` gives one item per *caption* (an image with 5 captions gives 5 items):
the plain image-and-caption pipeline of chapter 1. `collate_captions` pads a batch of
captions with `<pad>` (= 0) to the longest and keeps their lengths, which the decoder
and the loss use to ignore the padding. (The trainer does not load images: it batches
cached encoder outputs by image, see `caption_lib.train`.)

Shapes: B batch, L caption length incl. `<start>`/`<end>`, H x W image size, P = 49
regions, E = 2048 encoder channels.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from caption_lib.annotations import (
    SPLITS,
    Record,
    find_missing_images,
    load_dataset,
    load_image,
    read_annotations,
    split_records,
)
from caption_lib.vocab import Vocabulary, tokenize

__all__ = [
    "SPLITS",
    "CaptionDataset",
    "Record",
    "Vocabulary",
    "collate_captions",
    "find_missing_images",
    "load_dataset",
    "load_image",
    "read_annotations",
    "split_records",
    "summarize",
    "tokenize",
]


def _caption_index(records: Sequence[Record]) -> list[tuple[int, int]]:
    """(image index, caption index) for every caption."""
    return [(i, k) for i, r in enumerate(records) for k in range(len(r.captions))]


class CaptionDataset(Dataset):
    """One item per caption: `(image (3, H, W), caption (L,) int64)`."""

    def __init__(self, records: Sequence[Record], vocab: Vocabulary,
                 transform: Callable | None = None) -> None:
        self.records, self.vocab, self.transform = list(records), vocab, transform
        self.index = _caption_index(self.records)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, k = self.index[n]
        image = load_image(self.records[i].image)
        x = self.transform(image) if self.transform else _to_tensor(image)  # (3, H, W)
        caption = torch.tensor(self.vocab.encode(self.records[i].captions[k]))  # (L,)
        return x, caption


def _to_tensor(image) -> torch.Tensor:
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # (H*W*3,)
    x = x.view(image.height, image.width, 3).permute(2, 0, 1)  # (3, H, W)
    return x.float() / 255.0


def pad_captions(captions: Sequence, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths -> `(captions (B, Lmax) int64 padded with
    pad_id, lengths (B,) int64)`."""
    lengths = torch.tensor([len(c) for c in captions], dtype=torch.int64)  # (B,)
    padded = torch.full((len(captions), int(lengths.max())), pad_id, dtype=torch.int64)  # (B, L)
    for b, c in enumerate(captions):
        padded[b, : len(c)] = torch.as_tensor(c, dtype=torch.int64)
    return padded, lengths


def collate_captions(batch: Sequence[tuple], pad_id: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack `(x, caption[, index])` items: `(x (B, ...), captions (B, Lmax), lengths (B,),
    index (B,))`. Captions are padded with `pad_id`; `index` is the third item when there is
    one, else the position in the batch.
    """
    xs = torch.stack([torch.as_tensor(item[0]) for item in batch])  # (B, ...)
    captions, lengths = pad_captions([item[1] for item in batch], pad_id)  # (B, L), (B,)
    index = torch.tensor([int(item[2]) if len(item) > 2 else b  # (B,)
                          for b, item in enumerate(batch)], dtype=torch.int64)
    return xs, captions, lengths, index


def summarize(records: Sequence[Record], min_freq: int = 1, check_images: bool = True) -> dict:
    """Counts of a data set: images, captions, splits, vocabulary, caption lengths (tokens)."""
    lengths = [len(tokenize(c)) for r in records for c in r.captions]
    train = [c for r in records if r.split == "train" for c in r.captions]
    return {
        "images": len(records),
        "captions": len(lengths),
        "splits": dict(sorted(Counter(r.split for r in records).items())),
        "vocab_size": len(Vocabulary.build(train, min_freq=min_freq)),
        "min_freq": min_freq,
        "caption_length": {"min": min(lengths), "mean": round(statistics.fmean(lengths), 2),
                           "median": statistics.median(lengths), "max": max(lengths)},
        "missing_images": len(find_missing_images(records)) if check_images else None,
    }
