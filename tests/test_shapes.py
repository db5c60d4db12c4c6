"""The shapes generator: determinism, ground truth, grammar, cell masks, caching, CLI."""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch
from PIL import Image

from caption_lib import cli, load_dataset
from caption_lib.errors import CaptionLibError
from caption_lib.shapes import (
    COLOURS,
    MARKER,
    SHAPES,
    SIZES,
    captions_for,
    ensure_shapes,
    make_shapes,
    object_cell_mask,
    parse_mentions,
)
from caption_lib.vocab import tokenize


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = make_shapes(tmp_path_factory.mktemp("s") / "shapes", 4, 1, 1, seed=3, progress=False)
    return out, json.loads((out / "dataset_shapes.json").read_text())


def test_layout_and_karpathy_format(tiny):
    out, data = tiny
    assert data["dataset"] == "shapes"
    assert [im["split"] for im in data["images"]] == ["train"] * 4 + ["val", "test"]
    assert (out / MARKER).is_file()
    sentids = []
    for i, im in enumerate(data["images"]):
        assert im["imgid"] == i and im["filename"] == f"{i:05d}.png"
        assert len(im["sentences"]) == 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        sentids += im["sentids"]
        for s in im["sentences"]:
            assert s["tokens"] == tokenize(s["raw"]) and s["imgid"] == i
        with Image.open(out / "images" / im["filename"]) as image:
            assert image.mode == "RGB" and image.size == (224, 224)
    assert len(set(sentids)) == len(sentids) == 30


def test_same_seed_same_bytes(tiny, tmp_path):
    out, _ = tiny
    again = make_shapes(tmp_path / "again", 4, 1, 1, seed=3, progress=False)
    assert (again / "dataset_shapes.json").read_bytes() == (out / "dataset_shapes.json").read_bytes()
    for png in sorted((out / "images").iterdir()):
        assert (again / "images" / png.name).read_bytes() == png.read_bytes()
    other = make_shapes(tmp_path / "other", 4, 1, 1, seed=4, progress=False)
    assert (other / "dataset_shapes.json").read_bytes() != (out / "dataset_shapes.json").read_bytes()


def test_threads_write_what_one_thread_writes(tiny, tmp_path):
    """make_shapes draws its images on a thread pool: the entries, in index order, and
    the files equal those of drawing each image alone, one after another."""
    from caption_lib.shapes import _image_entry

    out, data = tiny
    (tmp_path / "images").mkdir()
    splits = ["train"] * 4 + ["val", "test"]
    alone = [_image_entry(i, split, 3, 224, tmp_path / "images", i * 5)
             for i, split in enumerate(splits)]
    assert json.loads(json.dumps(alone)) == data["images"]
    for png in sorted((out / "images").iterdir()):
        assert (tmp_path / "images" / png.name).read_bytes() == png.read_bytes()


def test_a_failed_image_stops_the_others(tmp_path, monkeypatch):
    """When one image fails, the images not yet started are dropped (the thread pool's
    queue is cancelled), and nothing is left on disk."""
    import threading
    import time

    from caption_lib import shapes

    calls, lock = [], threading.Lock()

    def slow_or_broken(index, *args):
        with lock:
            calls.append(index)
        if index == 0:
            raise OSError("disk full")
        time.sleep(0.01)
        return {}

    monkeypatch.setattr(shapes, "_image_entry", slow_or_broken)
    with pytest.raises(OSError, match="disk full"):
        make_shapes(tmp_path / "x", 200, 0, 0, progress=False)
    assert len(calls) < 50, f"{len(calls)} of 200 images were still drawn"
    assert list(tmp_path.iterdir()) == []


def test_ground_truth_is_consistent(tiny):
    out, data = tiny
    for im in data["images"]:
        objects = im["objects"]
        assert 1 <= len(objects) <= 3
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
            assert o["colour"] in COLOURS and o["shape"] in SHAPES and o["size"] in SIZES
            assert x1 - x0 == {"small": 64, "big": 96}[o["size"]]
        for a, b in combinations(objects, 2):  # boxes do not overlap
            ax0, ay0, ax1, ay1 = a["box"]
            bx0, by0, bx1, by1 = b["box"]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
        centres = [o["box"][0] + o["box"][2] for o in objects]
        assert centres == sorted(centres)  # canonical order: left to right
        scene = Counter((o["colour"], o["shape"]) for o in objects)
        for s in im["sentences"]:
            assert Counter(parse_mentions(s["raw"])) == scene, s["raw"]
        pixels = np.asarray(Image.open(out / "images" / im["filename"])).astype(int)
        for o in objects:  # the object's colour is at its box centre
            cx, cy = (o["box"][0] + o["box"][2]) // 2, (o["box"][1] + o["box"][3]) // 2
            r, g, b = pixels[cy + 10, cx]
            colour = {"red": r > 150 and g < 110, "green": g > 120 and r < 110,
                      "blue": b > 150 and r < 110, "yellow": r > 170 and g > 150 and b < 110}
            assert colour[o["colour"]], (o, (r, g, b))


def test_grammar_over_many_scenes():
    """Every reference names every object; <= 18 tokens; a small vocabulary; varied."""
    from caption_lib.shapes import _place

    words, canon_first = Counter(), 0
    for i in range(300):
        rng = np.random.default_rng([11, i])
        objects = _place(rng, 224)
        caps = captions_for(objects, rng)
        assert len(caps) == 5 and len(set(caps)) == 5
        scene = Counter((o["colour"], o["shape"]) for o in objects)
        for c in caps:
            assert Counter(parse_mentions(c)) == scene, c
            assert Counter(parse_mentions(tokenize(c))) == scene
            assert len(c.split()) <= 18
            words.update(c.split())
        canon_first += caps[0].split()[:4] == f"a {objects[0]['size']} {objects[0]['colour']} {objects[0]['shape']}".split()
    assert canon_first == 300
    assert 28 <= len(words) <= 40, sorted(words)


def test_scenes_are_balanced():
    from caption_lib.shapes import _place

    scenes = [_place(np.random.default_rng([7, i]), 224) for i in range(600)]
    counts = Counter(len(s) for s in scenes)
    assert all(150 <= counts[n] <= 250 for n in (1, 2, 3)), counts
    sizes = Counter(o["size"] for s in scenes for o in s)
    assert abs(sizes["big"] / sum(sizes.values()) - 0.5) < 0.05, sizes
    small = _place(np.random.default_rng(0), 128)  # objects scale with the image
    assert {o["box"][2] - o["box"][0] for o in small} <= {36, 54}


def test_relations_follow_the_geometry():
    left = {"shape": "circle", "colour": "red", "size": "small", "box": [10, 80, 74, 144]}
    right = {"shape": "square", "colour": "blue", "size": "small", "box": [150, 90, 214, 154]}
    below = {"shape": "triangle", "colour": "green", "size": "big", "box": [40, 120, 136, 216]}
    rng = np.random.default_rng(0)
    assert captions_for([left, right], rng)[0] == "a small red circle left of a small blue square"
    top = {**left, "box": [20, 5, 84, 69]}
    assert captions_for([top, below], rng)[0] == "a small red circle above a big green triangle"
    assert "a big green triangle below a small red circle" in _all_variants([top, below])


def _all_variants(objects):
    return {c for seed in range(30) for c in captions_for(objects, np.random.default_rng(seed))}


def test_parse_mentions():
    assert parse_mentions("a big red circle left of a small blue square") == [
        ("red", "circle"), ("blue", "square")]
    assert parse_mentions(["a", "yellow", "triangle", "and", "a", "yellow", "triangle"]) == [
        ("yellow", "triangle")] * 2
    assert parse_mentions("a big circle") == []  # no colour: nothing checkable
    assert parse_mentions("A Red Square") == [("red", "square")]


def test_object_cell_mask():
    mask = object_cell_mask({"box": [0, 0, 32, 32]})
    assert mask.shape == (7, 7) and mask.dtype == torch.bool
    assert mask.sum() == 1 and mask[0, 0]
    mask = object_cell_mask([40, 70, 104, 134])  # x cells 1..3, y cells 2..4
    rows, cols = mask.nonzero(as_tuple=True)
    assert sorted(set(rows.tolist())) == [2, 3, 4] and sorted(set(cols.tolist())) == [1, 2, 3]
    assert mask.sum() == 9
    flat = object_cell_mask([192, 192, 224, 224]).flatten()  # (49,) row-major
    assert flat.nonzero().flatten().tolist() == [48]
    assert object_cell_mask([10, 200, 20, 224]).flatten().nonzero().flatten().tolist() == [42]
    assert object_cell_mask([0, 0, 224, 224]).all()
    assert object_cell_mask([0, 0, 16, 16], grid=14).sum() == 1  # a 14x14 grid: 16 px cells


def test_ensure_shapes_generates_once_and_redoes_an_interrupted_run(tmp_path):
    sizes = {"n_train": 2, "n_val": 1, "n_test": 1}
    path = ensure_shapes(tmp_path, **sizes)
    assert (path / MARKER).is_file() and len(list((path / "images").iterdir())) == 4
    stamp = (path / "dataset_shapes.json").stat().st_mtime_ns
    assert ensure_shapes(tmp_path, **sizes) == path
    assert (path / "dataset_shapes.json").stat().st_mtime_ns == stamp  # reused
    (path / MARKER).unlink()  # as if interrupted
    (path / "images" / "00000.png").write_bytes(b"")
    assert ensure_shapes(tmp_path, **sizes) == path
    assert (path / MARKER).is_file() and (path / "images" / "00000.png").stat().st_size > 0


def test_ensure_shapes_defaults_to_the_workspace(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPTION_LIB_HOME", str(tmp_path / "ws"))
    path = ensure_shapes(n_train=1, n_val=0, n_test=1)
    assert path.parent == tmp_path / "ws"
    records = load_dataset(path)
    assert [r.split for r in records] == ["train", "test"]
    assert records[0].objects and records[0].image.is_file()


def test_make_shapes_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(CaptionLibError, match="not empty"):
        make_shapes(tmp_path / "x", 1, 0, 0, progress=False)


def test_cli_make_shapes(tmp_path, capsys):
    assert cli.main(["make-shapes", str(tmp_path / "o"), "--train", "2", "--val", "1",
                     "--test", "0", "--seed", "5"]) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    data = json.loads((tmp_path / "o" / "dataset_shapes.json").read_text())
    assert len(data["images"]) == 3 and data["seed"] == 5


def test_an_interrupted_make_shapes_leaves_nothing(tmp_path, monkeypatch):
    from caption_lib import shapes

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "_image_entry", boom)
    with pytest.raises(KeyboardInterrupt):
        make_shapes(tmp_path / "x", 2, 0, 0, progress=False)
    assert list(tmp_path.iterdir()) == []
