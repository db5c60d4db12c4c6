"""The `caption` command end to end on a tiny trained model: image modes, broken files."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_lib import cli
from caption_lib.caption import plot_path

SPECIAL = {"<start>", "<end>", "<pad>"}


def _scene(size: int = 64) -> Image.Image:
    """A small RGB picture: a red disc and a blue square on grey."""
    y, x = np.mgrid[:size, :size]
    pixels = np.full((size, size, 3), 200, dtype=np.uint8)
    pixels[(x - 20) ** 2 + (y - 20) ** 2 < 100] = (220, 30, 30)
    pixels[40:56, 36:52] = (30, 30, 220)
    return Image.fromarray(pixels, "RGB")


def _write_mode(folder: Path, mode: str) -> Path:
    """The scene saved in one PIL mode (CMYK as JPEG: PNG cannot hold it)."""
    rgb = _scene()
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # (H, W) full 16-bit range
        image = Image.fromarray(grey)  # mode "I;16"
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    else:
        image = rgb.convert(mode)
    path = folder / f"scene-{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    image.save(path)
    assert Image.open(path).mode in {mode, "I" if mode == "I;16" else mode}  # 16-bit: I;16 or I
    if mode == "I;16":
        assert np.asarray(Image.open(path)).max() > 255
    return path


def _bomb_png(path: Path, side: int = 100_000) -> Path:
    """A valid PNG header announcing side x side pixels (far above PIL's limit), tiny file."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def _broken(folder: Path, kind: str) -> Path:
    path = folder / f"{kind}.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "truncated":
        _scene().save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bomb":
        _bomb_png(path)
    elif kind == "missing":
        pass
    return path


@pytest.fixture(scope="module")
def good_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "scene.png"
    _scene().save(path)
    return path


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


def test_one_caption_per_image_and_every_mode(tiny_checkpoint, tmp_path, capsys):
    modes = ["RGB", "L", "RGBA", "CMYK", "P", "I;16", "LA", "1"]
    paths = [_write_mode(tmp_path, m) for m in modes]
    code = cli.main(["caption", str(tiny_checkpoint), *map(str, paths), "--device", "cpu",
                     "--beam-size", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    lines = _lines(out)
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    for line in lines:
        words = line.split("\t")[1].split()
        assert not SPECIAL & set(words), line
        assert len(words) <= 20


@pytest.mark.parametrize("kind, why", [
    ("empty", "not an image"),
    ("text", "not an image"),
    ("truncated", "broken image"),
    ("bomb", "image too large"),
    ("missing", "not found"),
])
def test_a_broken_file_is_one_line_and_the_others_are_still_captioned(
        tiny_checkpoint, good_image, tmp_path, capsys, kind, why):
    bad = _broken(tmp_path, kind)
    code = cli.main(["caption", str(tiny_checkpoint), str(good_image), str(bad),
                     str(good_image), "--device", "cpu", "--beam-size", "1"])
    out, err = capsys.readouterr()
    assert code == 2
    lines = _lines(out)
    assert [line.split("\t")[0] for line in lines] == [str(good_image)] * 2
    errors = [line for line in _lines(err) if line.startswith("caption-lib: error:")]
    assert errors == [line for line in errors if str(bad) in line and why in line]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    assert "1 of 3 images failed" in err


def test_decompression_bomb_below_twice_the_limit_is_refused_too(
        tiny_checkpoint, tmp_path, capsys, monkeypatch):
    # between PIL's limit and twice the limit PIL only warns; load_image refuses it anyway
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 60)
    path = tmp_path / "big.png"
    _scene(64).save(path)  # 4096 pixels: above 3600, below 7200
    assert cli.main(["caption", str(tiny_checkpoint), str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"caption-lib: error: {path}: image too large" in err


def test_greedy_and_beam_captions_and_json(tiny_checkpoint, good_image, tmp_path, capsys):
    bad = _broken(tmp_path, "empty")
    code = cli.main(["caption", str(tiny_checkpoint), str(good_image), str(bad), "--json",
                     "--beam-size", "3", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2
    result = json.loads(out)
    assert result["beam_size"] == 3
    assert [c["image"] for c in result["captions"]] == [str(good_image)]
    assert [e["image"] for e in result["errors"]] == [str(bad)]
    assert str(bad) in result["errors"][0]["error"]
    assert f"caption-lib: error: {bad}: not an image" in err


def test_beam_size_one_equals_greedy_caption_image(tiny_checkpoint, good_image, capsys):
    from caption_lib.decoding import caption_image
    from caption_lib.model import Captioner

    assert cli.main(["caption", str(tiny_checkpoint), str(good_image), "--beam-size", "1",
                     "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip().split("\t")[1]
    words, alphas = caption_image(Captioner.load(tiny_checkpoint), good_image, beam_size=1)
    assert printed == " ".join(words)
    assert alphas.shape == (len(words), 49)


def test_attention_plot_one_image_and_several(tiny_checkpoint, good_image, tmp_path, capsys):
    from caption_lib.decoding import caption_image
    from caption_lib.model import Captioner

    words, _ = caption_image(Captioner.load(tiny_checkpoint), good_image, beam_size=2)
    if not words:
        pytest.skip("the tiny model says nothing for this image: no figure to draw")
    out = tmp_path / "attention.png"
    args = ["caption", str(tiny_checkpoint), "--beam-size", "2", "--device", "cpu"]
    assert cli.main([*args, str(good_image), "--attention-plot", str(out)]) == 0
    assert Image.open(out).size[0] > 100
    bad = _broken(tmp_path, "text")
    assert cli.main([*args, str(good_image), str(bad), str(good_image),
                     "--attention-plot", str(out)]) == 2
    capsys.readouterr()
    written = sorted(p.name for p in tmp_path.glob("attention-*.png"))
    assert written == ["attention-1.png", "attention-3.png"]


def test_plot_path_numbering():
    assert plot_path("a/out.png", 1, 1) == Path("a/out.png")
    assert plot_path("a/out.png", 2, 3) == Path("a/out-2.png")
    assert plot_path("a/out", 2, 3) == Path("a/out-2.png")


def test_bad_checkpoint_and_bad_beam_size(tiny_checkpoint, good_image, tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert cli.main(["caption", str(missing), str(good_image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.pt" in err
    assert cli.main(["caption", str(tiny_checkpoint), str(good_image), "--beam-size", "0"]) == 2
    assert "--beam-size must be >= 1" in capsys.readouterr().err
