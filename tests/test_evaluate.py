"""Evaluation by real decoding, and the `evaluate` command end to end."""

from __future__ import annotations

import json

import pytest

from caption_lib import cli
from caption_lib.evaluate import evaluate
from caption_lib.model import Captioner

KEYS = {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rougeL", "meteor", "semantic_f1",
        "grounding"}


def test_evaluate_decodes_without_special_tokens(tiny_checkpoint, tiny_shapes):
    model = Captioner.load(tiny_checkpoint)
    result = evaluate(model, tiny_shapes, "test", beam_size=2, meteor=False, progress=False)
    assert result.scores["images"] == 6 and len(result.captions) == 6
    for item in result.captions:
        assert not {"<start>", "<end>", "<pad>"} & set(item["caption"].split())
    for key in KEYS - {"meteor"}:
        value = result.scores[key]
        assert 0 <= value <= (1 if key in {"semantic_f1", "grounding"} else 100), (key, value)
    assert len(result.alphas) == 6 and result.alphas[0].shape[1] == 49


def test_evaluate_command_prints_one_json_object(tiny_checkpoint, capsys):
    assert cli.main(["evaluate", str(tiny_checkpoint), "--json", "--limit", "3"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert KEYS <= set(scores)
    assert scores["meteor"] is None or 0 <= scores["meteor"] <= 100


@pytest.mark.parametrize("bad", ["missing.pt", "foreign.pt"])
def test_evaluate_command_rejects_bad_checkpoints(tmp_path, capsys, bad):
    path = tmp_path / bad
    if bad == "foreign.pt":
        path.write_bytes(b"not a checkpoint at all")
    assert cli.main(["evaluate", str(path), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and bad in err


def test_precision_reaches_the_search_from_both_commands(tiny_checkpoint, tiny_shapes,
                                                         monkeypatch, capsys):
    from caption_lib import decoding

    image = min(tiny_shapes.rglob("*.png"))
    asked = []
    real = decoding._in_precision

    def spy(decoder, features, precision):
        asked.append(precision)
        return real(decoder, features, precision)

    monkeypatch.setattr(decoding, "_in_precision", spy)
    assert cli.main(["evaluate", str(tiny_checkpoint), "--json", "--limit", "3", "--no-meteor",
                     "--precision", "bf16"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["decode_precision"] == "bf16" and 0 <= scores["semantic_f1"] <= 1
    assert asked and set(asked) == {"bf16"}
    asked.clear()
    assert cli.main(["caption", str(tiny_checkpoint), str(image), "--json",
                     "--precision", "bf16", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["precision"] == "bf16" and result["captions"][0]["caption"]
    assert asked == ["bf16"]
    with pytest.raises(SystemExit):  # argparse: one line naming the bad value
        cli.main(["evaluate", str(tiny_checkpoint), "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
