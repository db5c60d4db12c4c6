"""Figures (caption_lib.viz): attention overlays, image grids, training curves."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from caption_lib.viz import (
    plot_attention,
    plot_history,
    show_grid,
    to_numpy_image,
    upsample_attention,
)


def _images():
    rgb = Image.new("RGB", (32, 24), (200, 30, 30))
    return {
        "rgb": rgb,
        "gray": rgb.convert("L"),
        "rgba": rgb.convert("RGBA"),
        "palette": rgb.convert("P"),
        "i16": Image.fromarray(np.full((24, 32), 40000, dtype=np.uint16)),
        "tensor_chw": torch.rand(3, 24, 32),
        "normalised": torch.randn(3, 24, 32) * 2,  # like image_transform output
        "tensor_hw": torch.rand(24, 32),
        "uint8_hwc": np.full((24, 32, 3), 255, dtype=np.uint8),
    }


@pytest.mark.parametrize("name", list(_images()))
def test_to_numpy_image_any_input(name):
    array = to_numpy_image(_images()[name])
    assert array.shape == (24, 32, 3)
    assert array.dtype == np.float32
    assert 0.0 <= array.min() and array.max() <= 1.0


def test_to_numpy_image_from_path(tmp_path):
    path = tmp_path / "x.png"
    Image.new("LA", (10, 8), (100, 255)).save(path)
    assert to_numpy_image(path).shape == (8, 10, 3)


def test_upsample_attention_is_bilinear_and_keeps_uniform():
    up = upsample_attention(torch.full((49,), 1 / 49), (224, 224))
    assert up.shape == (224, 224)
    assert np.allclose(up, 1 / 49)
    one = torch.zeros(7, 7)
    one[3, 3] = 1.0
    up = upsample_attention(one, (70, 70))
    assert up[35, 35] == pytest.approx(up.max()) and up.max() <= 1.0  # peak on cell (3, 3)
    assert up[0, 0] == 0.0


@pytest.mark.parametrize("name", ["rgb", "gray", "rgba", "tensor_chw", "normalised"])
def test_plot_attention_one_axes_per_word(name):
    words = ["a", "red", "circle"]
    alphas = torch.softmax(torch.randn(4, 49), dim=1)  # (T, P) incl. an <end> row
    fig = plot_attention(_images()[name], words, alphas, cols=2)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == words
    assert len(fig.axes[0].images) == 2  # the image and the attention overlay
    assert fig._suptitle.get_text() == "a red circle"
    fig.canvas.draw()  # renders with any backend (Agg here)


def test_plot_attention_grid_maps_and_bad_shapes():
    fig = plot_attention(_images()["rgb"], "a red circle", torch.rand(3, 7, 7))
    assert len(fig.axes) == 3
    with pytest.raises(ValueError, match="does not fit"):
        plot_attention(_images()["rgb"], "a red circle", torch.rand(2, 49))
    with pytest.raises(ValueError, match="grid"):
        plot_attention(_images()["rgb"], ["a"], torch.rand(1, 36))


def test_show_grid_axes_and_captions():
    images = list(_images().values())[:5]
    captions = ["a red circle", ["a", "blue", "square"], "x\ny", "d", "e"]
    fig = show_grid(images, captions, cols=2, title="samples")
    assert len(fig.axes) == 5
    assert fig.axes[1].get_xlabel() == "a blue square"
    assert fig.axes[2].get_xlabel() == "x\ny"
    fig.canvas.draw()
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        show_grid(images[:2], ["a"])


def test_plot_history_lines():
    history = [{"epoch": e, "train_loss": 3.0 / e, "val_loss": 3.2 / e, "val_bleu4": 10.0 * e,
                "val_semantic_f1": 0.2 * e} for e in (1, 2, 3)]
    fig = plot_history(history)
    assert len(fig.axes) == 2
    loss_ax, score_ax = fig.axes
    assert len(loss_ax.lines) == 2 and len(score_ax.lines) == 2
    assert list(score_ax.lines[0].get_ydata()) == [10.0, 20.0, 30.0]
    assert np.allclose(score_ax.lines[1].get_ydata(), [20.0, 40.0, 60.0])
    fig.canvas.draw()
    only_loss = plot_history([{"epoch": 1, "train_loss": 2.0}])
    assert len(only_loss.axes[0].lines) == 1 and len(only_loss.axes[1].lines) == 0
    with pytest.raises(ValueError, match="empty"):
        plot_history([])


def test_no_pyplot_figures_left_open():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot_attention(_images()["rgb"], ["a"], torch.rand(1, 49))
    show_grid([_images()["rgb"]], ["a"])
    plot_history([{"epoch": 1, "train_loss": 1.0}])
    assert plt.get_fignums() == before
    assert matplotlib.get_backend()  # nothing above switched or needed a GUI backend
