"""COCO in Karpathy's format: `filepath` folders, the restval split and the `coco` recipe.

The test writes a tiny `dataset_coco.json` in the real file's layout (images under
train2014/ and val2014/, splits train / restval / val / test) from shapes images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from caption_lib.annotations import find_missing_images, load_dataset, split_records
from caption_lib.errors import CaptionLibError
from caption_lib.model import Captioner
from caption_lib.train import _train_records, recipe, train
from conftest import tiny_configs

SPLITS = ["train"] * 6 + ["restval"] * 6 + ["val"] * 4 + ["test"] * 2


@pytest.fixture(scope="module")
def tiny_coco(tiny_shapes, tmp_path_factory) -> Path:
    """18 images: 6 train, 6 restval (their captions say "zebra"), 4 val, 2 test."""
    shapes = json.loads((tiny_shapes / "dataset_shapes.json").read_text())["images"]
    root = tmp_path_factory.mktemp("coco")
    images = []
    for k, (entry, split) in enumerate(zip(shapes, SPLITS)):
        folder = "val2014" if split in ("val", "test") or k % 4 == 0 else "train2014"
        name = f"COCO_{folder}_{k:012d}.png"
        (root / folder).mkdir(exist_ok=True)
        shutil.copy(tiny_shapes / "images" / entry["filename"], root / folder / name)
        sentences = [{"raw": s["raw"] + (" near a zebra" if split == "restval" else ""),
                      "tokens": []} for s in entry["sentences"]]
        images.append({"filepath": folder, "filename": name, "imgid": k, "cocoid": 1000 + k,
                       "split": split, "sentences": sentences})
    (root / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return root


def test_filepath_folders_and_restval_are_read(tiny_coco):
    records = load_dataset(tiny_coco, restval_to_train=False)
    assert find_missing_images(records) == []
    assert {r.image.parent.name for r in records} == {"train2014", "val2014"}
    assert [len(split_records(records, s)) for s in ("train", "restval", "val", "test")] == [
        6, 6, 4, 2]
    assert len(_train_records(records, "train")) == 12
    assert len(_train_records(records, "drop")) == 6
    folded = [r.image for r in split_records(load_dataset(tiny_coco), "train")]
    assert [r.image for r in _train_records(records, "train")] == folded, "file order kept"
    with pytest.raises(CaptionLibError, match="restval='val': use 'train' or 'drop'"):
        _train_records(records, "val")


@pytest.mark.parametrize("restval", ["train", "drop"])
def test_training_on_coco_folds_or_drops_restval(tiny_coco, tmp_path, restval):
    model_config, config = tiny_configs(epochs=1)
    config.restval = restval
    result = train(tiny_coco, tmp_path / restval, model_config, config, progress=False,
                   log=lambda *_: None)
    assert ("zebra" in result.model.vocab.itos) == (restval == "train")
    saved = json.loads(Captioner.load(tmp_path / restval / "last.pt").extra["train_config"])
    assert saved["restval"] == restval


def test_the_coco_recipe():
    model_config, config = recipe("coco")
    assert config.restval == "train" and config.val_images == 5000
    assert model_config.encoder_weights == "DEFAULT"
    with pytest.raises(CaptionLibError, match="unknown recipe 'cocoa'"):
        recipe("cocoa")
