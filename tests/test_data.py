"""Annotation readers, vocabulary, image loading, datasets and collate."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from caption_lib import (
    CaptionDataset,
    Record,
    Vocabulary,
    collate_captions,
    find_missing_images,
    load_dataset,
    load_image,
    read_annotations,
    split_records,
    tokenize,
)
from caption_lib.annotations import detect_format, hash_split
from caption_lib.errors import CaptionLibError

# ---------------------------------------------------------------- fixtures -------------


def _karpathy(tmp_path: Path, images: list[dict], name="dataset_flickr8k.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"dataset": "flickr8k", "images": images}), encoding="utf-8")
    return path


def _img(filename, split, *raws, **extra):
    return {"filename": filename, "split": split, **extra,
            "sentences": [{"raw": r, "tokens": tokenize(r)} for r in raws]}


def _flickr8k(tmp_path: Path, lines: list[str], splits=None) -> Path:
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    names = {"train": "trainImages", "val": "devImages", "test": "testImages"}
    for split, images in (splits or {}).items():
        (tmp_path / f"Flickr_8k.{names[split]}.txt").write_text("\n".join(images) + "\n")
    return path


def _kaggle(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "captions.txt"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- readers --------------


def test_karpathy_json(tmp_path):
    (tmp_path / "images").mkdir()
    path = _karpathy(tmp_path, [
        _img("a.jpg", "train", "A dog runs.", "A brown dog, running"),
        _img("b.jpg", "restval", "Ein Café in Zürich"),
        _img("c.jpg", "val", "two cats"),
        _img("d.jpg", "test", "a bird", filepath="val2014"),
        {"filename": "e.jpg", "split": "test", "sentences": [{"tokens": ["a", "red", "kite"]}]},
    ])
    assert detect_format(path) == "karpathy"
    records = read_annotations(path)
    assert [r.split for r in records] == ["train", "train", "val", "test", "test"]
    assert records[0] == Record(tmp_path / "images" / "a.jpg", ["A dog runs.", "A brown dog, running"],
                                "train", "a.jpg")
    assert records[1].captions == ["Ein Café in Zürich"]
    assert records[3].image == tmp_path / "images" / "val2014" / "d.jpg"
    assert records[4].captions == ["a red kite"]
    kept = read_annotations(path, tmp_path / "elsewhere", restval_to_train=False)
    assert kept[1].split == "restval" and kept[0].image == tmp_path / "elsewhere" / "a.jpg"
    assert [r.image_id for r in split_records(kept, "restval")] == ["b.jpg"]


def test_flickr8k_token_file(tmp_path):
    lines = ["1000_a.jpg#0\tA child in a pink dress , climbing .",
             "1000_a.jpg#1\tA girl going into a \"wooden\" building .",
             "2000_b.jpg#0\tUn garçon joue .",
             "3000_c.jpg#0\tA dog .",
             "9999_x.jpg#0\tAn image in no split ."]
    path = _flickr8k(tmp_path, lines, {"train": ["1000_a.jpg"], "val": ["2000_b.jpg"],
                                       "test": ["3000_c.jpg"]})
    (tmp_path / "Flicker8k_Dataset").mkdir()
    assert detect_format(path) == "flickr8k"
    skipped = Counter()
    with pytest.warns(UserWarning, match="skipped 1 unsplit"):
        records = read_annotations(path, skipped=skipped)
    assert skipped == {"unsplit": 1}
    assert [(r.image_id, r.split, len(r.captions)) for r in records] == [
        ("1000_a.jpg", "train", 2), ("2000_b.jpg", "val", 1), ("3000_c.jpg", "test", 1)]
    assert records[0].captions[1] == 'A girl going into a "wooden" building .'
    assert records[1].captions == ["Un garçon joue ."]
    assert records[0].image == tmp_path / "Flicker8k_Dataset" / "1000_a.jpg"


def test_kaggle_captions_csv(tmp_path):
    text = ('image,caption\n'
            '1000_a.jpg,A child in a pink dress is climbing up a set of stairs .\n'
            '1000_a.jpg,"A girl, in pink, says ""hi"" ."\n'
            '1000_a.jpg,an unquoted, comma\n'
            '2000_b.jpg,Ein Mädchen läuft .\n')
    path = _kaggle(tmp_path, text)
    assert detect_format(path) == "kaggle"
    records = read_annotations(path)
    assert records[0].captions == ["A child in a pink dress is climbing up a set of stairs .",
                                   'A girl, in pink, says "hi" .', "an unquoted, comma"]
    assert records[1].captions == ["Ein Mädchen läuft ."]
    assert [r.split for r in records] == [hash_split("1000_a.jpg"), hash_split("2000_b.jpg")]


def test_kaggle_uses_flickr_split_lists_when_present(tmp_path):
    path = _kaggle(tmp_path, "image,caption\na.jpg,one\nb.jpg,two\n")
    _flickr8k(tmp_path, ["a.jpg#0\tx"], {"train": ["b.jpg"], "val": [], "test": ["a.jpg"]})
    assert [(r.image_id, r.split) for r in read_annotations(path)] == [("a.jpg", "test"),
                                                                        ("b.jpg", "train")]


def test_hash_split_proportions():
    counts = Counter(hash_split(f"{i}.jpg") for i in range(8000))
    assert abs(counts["train"] / 8000 - 0.75) < 0.02
    assert abs(counts["val"] / 8000 - 0.125) < 0.02


def test_load_dataset_finds_the_annotation_file(tmp_path):
    _kaggle(tmp_path, "image,caption\na.jpg,one\n")
    assert load_dataset(tmp_path)[0].captions == ["one"]
    _karpathy(tmp_path, [_img("a.jpg", "train", "from json")])
    assert load_dataset(tmp_path)[0].captions == ["from json"]  # Karpathy JSON first
    (tmp_path / "x").mkdir()
    with pytest.raises(CaptionLibError, match="x: no annotation file"):
        load_dataset(tmp_path / "x")
    with pytest.raises(CaptionLibError, match="not found"):
        load_dataset(tmp_path / "nope")


# ---------------------------------------------------------------- bad input ------------


@pytest.mark.parametrize("lines, message", [
    (["a.jpg#0\tok", "no tab here"], r"Flickr8k.token.txt:2: malformed line"),
    (["a.jpg#0\tok", "a.jpg#0\tagain"], r"Flickr8k.token.txt:2: duplicate caption id a.jpg#0"),
])
def test_bad_token_files(tmp_path, lines, message):
    path = _flickr8k(tmp_path, lines)
    with pytest.raises(CaptionLibError, match=message):
        read_annotations(path)


def test_image_in_two_split_lists(tmp_path):
    path = _flickr8k(tmp_path, ["a.jpg#0\tok"], {"train": ["a.jpg"], "val": [], "test": ["a.jpg"]})
    with pytest.raises(CaptionLibError, match=r"testImages.txt:1: a.jpg is already in the train"):
        read_annotations(path)


@pytest.mark.parametrize("images, message", [
    ([_img("a.jpg", "dev", "x")], r"images\[0\]: unknown split 'dev'"),
    ([_img("a.jpg", "train", "x"), _img("a.jpg", "val", "y")], r"images\[1\]: duplicate image a.jpg"),
    ([{"split": "train", "sentences": []}], r"images\[0\]: no 'filename'"),
    ([{"filename": "a.jpg", "split": "train", "sentences": [{}]}], r"sentences\[0\] has neither"),
])
def test_bad_karpathy_json(tmp_path, images, message):
    with pytest.raises(CaptionLibError, match=message):
        read_annotations(_karpathy(tmp_path, images))


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "dataset_x.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",,}\n]}')
    with pytest.raises(CaptionLibError, match=r"dataset_x.json:2: malformed JSON"):
        read_annotations(path)


def test_malformed_csv_row_names_the_line(tmp_path):
    path = _kaggle(tmp_path, "image,caption\na.jpg,fine\nlonely\n")
    with pytest.raises(CaptionLibError, match=r"captions.txt:3: malformed row"):
        read_annotations(path)


def test_unknown_format_and_missing_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world\n")
    with pytest.raises(CaptionLibError, match=r"notes.txt:1: unknown annotation format"):
        read_annotations(path)
    with pytest.raises(CaptionLibError, match="annotation file not found"):
        read_annotations(tmp_path / "missing.json")
    (tmp_path / "latin1.txt").write_bytes("image,caption\na.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(CaptionLibError, match="latin1.txt: not UTF-8"):
        read_annotations(tmp_path / "latin1.txt")


def test_empty_and_duplicate_captions_are_counted_skips(tmp_path):
    path = _karpathy(tmp_path, [_img("a.jpg", "train", "ok", "   ", "ok"),
                                _img("b.jpg", "train", "", "\t")])
    skipped = Counter()
    with pytest.warns(UserWarning, match="3 empty_caption"):
        records = read_annotations(path, skipped=skipped)
    assert skipped == {"empty_caption": 3, "duplicate_caption": 1, "no_captions": 1}
    assert [(r.image_id, r.captions) for r in records] == [("a.jpg", ["ok"])]
    path = _kaggle(tmp_path, "image,caption\na.jpg,   \n")
    with pytest.raises(CaptionLibError, match="no image with a caption"), pytest.warns(UserWarning):
        read_annotations(path)


def test_missing_images_are_found(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "a.png")
    records = read_annotations(_karpathy(tmp_path, [_img("a.png", "train", "x"),
                                                    _img("b.png", "train", "y")]))
    assert find_missing_images(records) == [tmp_path / "images" / "b.png"]
    with pytest.raises(CaptionLibError, match=r"b.png: image file not found"):
        load_image(records[1].image)


# ---------------------------------------------------------------- images ---------------


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "1", "RGB"])
def test_load_image_converts_every_mode_to_rgb(tmp_path, mode):
    rgb = Image.new("RGB", (8, 6), (200, 100, 50))
    image = rgb.convert(mode) if mode not in ("I;16",) else Image.fromarray(
        np.full((6, 8), 51400, dtype=np.uint16))  # 51400 / 257 = 200
    suffix = ".jpg" if mode == "CMYK" else ".tif" if mode == "I;16" else ".png"
    image.save(tmp_path / f"x{suffix}")
    out = load_image(tmp_path / f"x{suffix}")
    assert out.mode == "RGB" and out.size == (8, 6)
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (200, 200, 200)  # scaled, not clipped to 255


def test_load_image_puts_transparency_on_white(tmp_path):
    Image.new("RGBA", (2, 2), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_broken_images_are_clear_errors(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(CaptionLibError, match=r"empty.jpg: not an image"):
        load_image(tmp_path / "empty.jpg")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptionLibError, match=r"cut.png: broken image"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(CaptionLibError, match=r"big.png: image too large"):
        load_image(tmp_path / "big.png")


# ---------------------------------------------------------------- vocabulary -----------


def test_tokenize_is_offline_lowercase_without_punctuation():
    assert tokenize("A dog, running on the BEACH.") == ["a", "dog", "running", "on", "the", "beach"]
    assert tokenize("Ein Café — in Zürich!") == ["ein", "café", "in", "zürich"]
    assert tokenize("   ") == []
    first = tokenize("A dog, running.")  # remembered: a second call is a new, equal list
    first.append("changed")
    assert tokenize("A dog, running.") == ["a", "dog", "running"]


def test_vocabulary_build_encode_decode(tmp_path):
    vocab = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_freq=2)
    assert vocab.itos == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert len(vocab) == 6 and "dog" in vocab and "cat" not in vocab
    assert vocab.encode("A dog flies") == [1, 4, 5, 3, 2]
    assert vocab.decode([1, 4, 5, 3, 2, 4, 0]) == "a dog <unk>"  # stops at <end>
    assert vocab.decode_tokens([0, 1, 5, 0]) == ["dog"]
    loaded = Vocabulary.load(vocab.save(tmp_path / "vocab.json"))
    assert loaded.itos == vocab.itos and loaded.min_freq == 2
    assert Vocabulary.from_dict(vocab.to_dict()).stoi == vocab.stoi


def test_vocabulary_bad_files(tmp_path):
    (tmp_path / "v.json").write_text('{"itos": ["a", "b"]}')
    with pytest.raises(CaptionLibError, match="v.json: vocabulary: 'itos'"):
        Vocabulary.load(tmp_path / "v.json")
    (tmp_path / "w.json").write_text("{not json")
    with pytest.raises(CaptionLibError, match="w.json: not a vocabulary JSON"):
        Vocabulary.load(tmp_path / "w.json")
    with pytest.raises(CaptionLibError, match="min_freq"):
        Vocabulary.build(["a"], min_freq=0)


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyzéü0123456789", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(words, min_size=1, max_size=10), min_size=1, max_size=6))
def test_encode_decode_round_trip(captions):
    texts = [" ".join(c) for c in captions]
    vocab = Vocabulary.build(texts)
    for text in texts:
        ids = vocab.encode(text)
        assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id and len(ids) == len(
            tokenize(text)) + 2
        assert vocab.decode(ids) == " ".join(tokenize(text))
    again = Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again.itos == vocab.itos


def test_vocabulary_comes_from_the_training_split_only(tmp_path):
    records = [Record(Path("a"), ["a dog"], "train", "a"), Record(Path("b"), ["a zebra"], "test", "b")]
    vocab = Vocabulary.build(c for r in split_records(records, "train") for c in r.captions)
    assert "zebra" not in vocab
    with pytest.raises(CaptionLibError, match="unknown split 'dev'"):
        split_records(records, "dev")


# ---------------------------------------------------------------- datasets -------------


@pytest.fixture()
def small(tmp_path):
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        Image.new("RGB", (10, 8), colour).save(tmp_path / f"{i}.png")
    records = [Record(tmp_path / "0.png", ["a red box", "red"], "train", "0"),
               Record(tmp_path / "1.png", ["a green box here"], "train", "1")]
    return records, Vocabulary.build(c for r in records for c in r.captions)


def test_caption_dataset(small):
    records, vocab = small
    captions = CaptionDataset(records, vocab)
    assert len(captions) == 3
    x, caption = captions[1]
    assert x.shape == (3, 8, 10) and torch.allclose(x[:, 0, 0], torch.tensor([1.0, 0, 0]))
    assert vocab.decode(caption) == "red" and caption.dtype == torch.int64


def test_collate_pads_and_keeps_lengths(small):
    records, vocab = small
    batch = [CaptionDataset(records, vocab)[i] for i in range(3)]
    x, captions, lengths, index = collate_captions(batch)
    assert x.shape == (3, 3, 8, 10)
    assert lengths.tolist() == [5, 3, 6] and captions.shape == (3, 6)
    assert captions.dtype == torch.int64 and captions[1, 3:].tolist() == [0, 0, 0]
    assert index.tolist() == [0, 1, 2]
    loader = torch.utils.data.DataLoader(CaptionDataset(records, vocab), batch_size=2,
                                         collate_fn=collate_captions)
    assert [b[1].shape[1] for b in loader] == [5, 6]


def test_collate_takes_a_third_item_as_the_index(small):
    records, vocab = small
    features = torch.arange(2 * 49 * 4, dtype=torch.float16).view(2, 49, 4)  # (N, P, E)
    items = [(features[i], torch.tensor(vocab.encode(c)), i)
             for i, r in enumerate(records) for c in r.captions]
    x, _, lengths, index = collate_captions(items)
    assert x.shape == (3, 49, 4) and index.tolist() == [0, 0, 1] and lengths.tolist() == [5, 3, 6]
