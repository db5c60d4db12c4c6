"""`caption-lib inspect`: counts, splits, vocabulary, lengths, missing images, skips."""

from __future__ import annotations

import json

from caption_lib import cli, make_shapes


def test_inspect_json_on_a_shapes_folder(tmp_path, capsys):
    out = make_shapes(tmp_path / "s", 3, 1, 1, seed=0, progress=False)
    (out / "images" / "00004.png").unlink()
    assert cli.main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"images", "captions", "splits", "vocab_size", "missing_images"} <= set(info)
    assert info["images"] == 5 and info["captions"] == 25
    assert info["splits"] == {"test": 1, "train": 3, "val": 1}
    assert info["missing_images"] == 1
    assert 8 <= info["vocab_size"] <= 40
    assert 3 <= info["caption_length"]["min"] <= info["caption_length"]["max"] <= 18


def test_inspect_text_on_a_token_file_with_skips(tmp_path, capsys):
    (tmp_path / "Flickr8k.token.txt").write_text(
        "a.jpg#0\tA dog .\na.jpg#1\t  \nb.jpg#0\tA dog runs .\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("")
    assert cli.main(["inspect", str(tmp_path / "Flickr8k.token.txt"), "--min-freq", "2",
                     "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["captions"] == 2 and info["splits"] == {"train": 2}
    assert info["vocab_size"] == 4 + 2  # specials + "a", "dog"
    assert info["skipped"] == {"empty_caption": 1}
    assert info["missing_images"] == 2
    assert cli.main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "3 images" not in text and "2 images, 2 captions" in text
    assert "skipped      1 empty_caption" in text


def test_inspect_bad_file_is_one_line(tmp_path, capsys):
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,ok\nbroken\n")
    assert cli.main(["inspect", str(tmp_path / "captions.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "captions.txt:3: malformed row" in err
