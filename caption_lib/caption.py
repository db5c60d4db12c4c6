"""The `caption` command: caption image files with a trained checkpoint.

    caption-lib caption CHECKPOINT IMAGE... [--beam-size K] [--attention-plot OUT.png]
                        [--max-len N] [--device auto|cpu|cuda] [--json]

One line per image on stdout, `IMAGE<TAB>caption`, in the order given (`--json`: one JSON
object instead, see `caption_files`). Each image goes through `decoding.caption_image`:
the encoder on the image resized to 224x224, then beam search (greedy with
`--beam-size 1`); images of any PIL mode (grayscale, RGBA, CMYK, palette, 16-bit) are
converted to RGB first (`annotations.load_image`).

A file that is not a readable image (missing, zero bytes, truncated, another format, or
larger than PIL's decompression-bomb limit `PIL.Image.MAX_IMAGE_PIXELS`) gives one line
`caption-lib: error: FILE: what is wrong` on stderr; the other images are still
captioned, and the command exits 2 when any file failed (0 otherwise).

`--attention-plot OUT.png` writes the word-by-word attention figure (`viz.plot_attention`):
for one image to OUT.png itself; for several images to OUT-1.png, OUT-2.png, ..., numbered
by the image's position among the IMAGE arguments (a failed image leaves its number out).

Letters: T words of a caption, P regions (49).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from caption_lib.decoding import MAX_LEN, caption_image
from caption_lib.errors import CaptionLibError
from caption_lib.model import Captioner


@dataclass
class CaptionedFile:
    """The outcome for one image file: its words and attention, or why it failed."""

    image: str
    words: list[str] = field(default_factory=list)
    alphas: torch.Tensor | None = None  # (T, P)
    error: str | None = None  # one line naming the file, when it failed
    plot: str | None = None  # the attention figure written, if any


def plot_path(out: str | Path, index: int, count: int) -> Path:
    """Where the attention figure of image `index` (1-based) of `count` goes."""
    out = Path(out)
    if count == 1:
        return out
    return out.with_name(f"{out.stem}-{index}{out.suffix or '.png'}")


def caption_files(model: Captioner, images: list[str | Path], beam_size: int = 3,
                  max_len: int = MAX_LEN, device: str | torch.device = "cpu",
                  attention_plot: str | Path | None = None,
                  precision: str = "fp32") -> list[CaptionedFile]:
    """Caption each image file; a broken file is reported in its result, never raised.

    Args:
        model: a trained `Captioner`.
        images: paths of image files.
        beam_size: beams per image (1: greedy decoding).
        max_len: at most this many decoding steps.
        device: where to run the model.
        attention_plot: write the attention figures there (see the module docstring).
        precision: the search's, "fp32" or "bf16" (`decoding.greedy_decode`).

    Returns:
        one `CaptionedFile` per image, in order.
    """
    from caption_lib.viz import plot_attention

    model.to(device).eval()
    results = []
    for index, image in enumerate(images, start=1):
        result = CaptionedFile(image=str(image))
        try:
            result.words, result.alphas = caption_image(model, image, beam_size=beam_size,
                                                        max_len=max_len, device=device,
                                                        precision=precision)
        except CaptionLibError as err:
            result.error = str(err)
        if attention_plot is not None and result.error is None and result.words:
            path = plot_path(attention_plot, index, len(images))
            fig = plot_attention(image, result.words, result.alphas,
                                 title=f"{Path(image).name}: {' '.join(result.words)}")
            try:
                fig.savefig(path, dpi=80)
            except OSError as err:
                raise CaptionLibError(f"{path}: cannot write the attention plot "
                                      f"({err.strerror or err})") from None
            result.plot = str(path)
        results.append(result)
    return results


__all__ = ["CaptionedFile", "caption_files", "plot_path"]
