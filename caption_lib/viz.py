"""Pictures of what the model does: attention overlays, captioned image grids, loss curves.

"Show, Attend and Tell" (Xu et al. 2015, Fig. 2-3) shows, for each generated word, where
the model looked: the 7x7 attention map alpha_t, upsampled to the image size, over the
image. `plot_attention` draws that figure; `show_grid` shows images with their captions;
`plot_history` shows the training curves (`caption_lib.train` history).

All functions build a `matplotlib.figure.Figure` directly (no pyplot: nothing is left
open in pyplot's global list and any backend, Agg included, works). In a notebook show it
by ending the cell with the figure; save it with `fig.savefig(path)`.

Shapes: T words, P regions (grid x grid = 49), H x W image pixels.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

ImageLike = Image.Image | torch.Tensor | np.ndarray | str | Path


def to_numpy_image(image: ImageLike) -> np.ndarray:
    """Any image (PIL of any mode, a path, a (3, H, W)/(H, W, 3)/(H, W) tensor or array)
    as a float (H, W, 3) array in [0, 1] for `imshow`. Normalised tensors (values outside
    [0, 1], e.g. after `image_transform`) are min-max scaled."""
    if isinstance(image, (str, Path)):
        from caption_lib.annotations import load_image

        image = load_image(image)
    if isinstance(image, Image.Image):
        from caption_lib.annotations import to_rgb

        return np.asarray(to_rgb(image), dtype=np.float32) / 255.0  # (H, W, 3)
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) \
        else np.asarray(image)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # (H, W, C)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]  # drop alpha
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=2)  # (H, W, 3)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"cannot show an image of shape {tuple(array.shape)}")
    lo, hi = float(array.min()), float(array.max())
    if lo < 0.0 or hi > 1.0:
        array = (array - lo) / max(hi - lo, 1e-8)
    return array


def upsample_attention(alpha: torch.Tensor, size: tuple[int, int], grid: int = 7) -> np.ndarray:
    """One attention map (P,) or (grid, grid) bilinearly upsampled to (H, W)."""
    a = torch.as_tensor(alpha).detach().float().cpu().reshape(1, 1, grid, grid)  # (1, 1, 7, 7)
    up = F.interpolate(a, size=size, mode="bilinear", align_corners=False)  # (1, 1, H, W)
    return up[0, 0].numpy()  # (H, W)


def _grid_figure(n: int, cols: int, panel: tuple[float, float]) -> tuple[Figure, list]:
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def plot_attention(image: ImageLike, words: Sequence[str] | str, alphas: torch.Tensor,
                   grid: int = 7, cols: int = 5, overlay: float = 0.6,
                   title: str | None = None) -> Figure:
    """The word-by-word attention figure: per word, the image under its upsampled alpha.

    Args:
        image: the captioned image (PIL, path, tensor or array; any mode).
        words: the caption's words (a string is split on spaces).
        alphas: (T, P) or (T, grid, grid) attention, row t for word t (T >= len(words);
            extra rows, e.g. the <end> step, are ignored).
        grid: side of the attention grid (7 for P = 49).
        cols: panels per row.
        overlay: opacity of the attention map (bright = attended).
        title: optional figure title (default: the caption).

    Returns:
        a Figure with one axes per word, titled with the word.
    """
    words = words.split() if isinstance(words, str) else list(words)
    alphas = torch.as_tensor(alphas).detach().float().cpu()
    alphas = alphas.reshape(alphas.size(0), -1) if alphas.dim() > 1 else alphas.reshape(1, -1)
    if not words:
        raise ValueError("no words to plot")
    if alphas.size(0) < len(words) or alphas.size(1) != grid * grid:
        raise ValueError(f"attention {tuple(alphas.shape)} does not fit {len(words)} words "
                         f"on a {grid}x{grid} grid")
    picture = to_numpy_image(image)  # (H, W, 3)
    size = picture.shape[:2]
    fig, axes = _grid_figure(len(words), cols, (2.2, 2.4))
    for t, (ax, word) in enumerate(zip(axes, words)):
        heat = upsample_attention(alphas[t], size, grid)  # (H, W)
        ax.imshow(picture)
        ax.imshow(heat, cmap="gray", alpha=overlay)
        ax.set_title(word, fontsize=11)
        ax.set_axis_off()
    fig.suptitle(title if title is not None else " ".join(words))
    return fig


def show_grid(images: Sequence[ImageLike], captions: Sequence[str | Sequence[str]],
              cols: int = 4, title: str | None = None, width: int = 32) -> Figure:
    """Images with their captions underneath (one axes per image).

    Args:
        images: PIL images, paths, tensors or arrays.
        captions: one caption per image (a string or a list of words); may hold several
            lines, e.g. "generated\\nreference".
        cols: images per row.
        title: optional figure title.
        width: characters per caption line before wrapping.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images to show")
    fig, axes = _grid_figure(len(images), cols, (3.0, 3.4))
    for ax, image, caption in zip(axes, images, captions):
        text = caption if isinstance(caption, str) else " ".join(caption)
        lines = [textwrap.fill(line, width) for line in text.split("\n")]
        ax.imshow(to_numpy_image(image))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("\n".join(lines), fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def _series(history: Sequence[dict[str, Any]], *keys: str) -> tuple[list, list] | None:
    """(epochs, values) of the first key present in the history, else None."""
    for key in keys:
        if any(key in h for h in history):
            points = [(h.get("epoch", i + 1), h[key]) for i, h in enumerate(history)
                      if h.get(key) is not None]
            return [p[0] for p in points], [p[1] for p in points]
    return None


def plot_history(history: Sequence[dict[str, Any]], title: str | None = "Training") -> Figure:
    """Loss (train and validation) and validation BLEU-4 per epoch, side by side.

    Args:
        history: one dict per epoch as `caption_lib.train` records it, with (some of)
            "epoch", "train_loss", "val_loss", "val_bleu4" and "val_semantic_f1" (0-1,
            drawn x100 next to BLEU-4).
    """
    if not history:
        raise ValueError("empty history: nothing to plot")
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    loss_ax, score_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, keys in (("train", ("train_loss", "loss")), ("validation", ("val_loss",))):
        series = _series(history, *keys)
        if series:
            loss_ax.plot(*series, marker="o", label=label)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy per word", title="Loss")
    bleu = _series(history, "val_bleu4", "bleu4")
    if bleu:
        score_ax.plot(*bleu, marker="o", label="BLEU-4")
    f1 = _series(history, "val_semantic_f1", "semantic_f1")
    if f1:
        score_ax.plot(f1[0], [100 * v for v in f1[1]], marker="s", label="semantic F1 x100")
    score_ax.set(xlabel="epoch", ylabel="score (x100)", title="Validation")
    for ax in (loss_ax, score_ax):
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


__all__ = ["plot_attention", "plot_history", "show_grid", "to_numpy_image",
           "upsample_attention"]
