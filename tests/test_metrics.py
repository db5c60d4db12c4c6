"""Text metrics, semantic F1 and attention grounding (caption_lib.metrics)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from caption_lib import metrics
from caption_lib.metrics import (
    bleu,
    coco_bleu,
    coco_scores,
    grounding,
    grounding_report,
    mention_errors,
    semantic_f1,
)


def toks(text):
    """A caption as tokens."""
    return text.split()


WORDS = toks("a big small red green blue yellow circle square triangle left of right above "
             "below and there are two three shapes picture")


def realistic_corpus(n_images=60, seed=0):
    """Shapes-like captions: 5 references per image, a hypothesis made by editing one."""
    rng = random.Random(seed)
    refs, hyps = [], []
    for _ in range(n_images):
        colour, shape = rng.choice(("red", "blue", "green")), rng.choice(("circle", "square"))
        base = ["a", rng.choice(("big", "small")), colour, shape]
        if rng.random() < 0.7:
            base += ["left", "of", "a", rng.choice(("red", "blue")), rng.choice(("triangle",
                                                                                "circle"))]
        image_refs = []
        for _ in range(5):
            r = list(base)
            if rng.random() < 0.5:
                r = ["a", "picture", "of", *r]
            if rng.random() < 0.4:
                r.remove(r[1] if r[1] in ("big", "small") else r[-1])
            image_refs.append(r)
        hyp = list(rng.choice(image_refs))
        for _ in range(rng.randint(0, 3)):
            op = rng.random()
            if op < 0.4 and len(hyp) > 2:
                hyp[rng.randrange(len(hyp))] = rng.choice(WORDS)
            elif op < 0.7:
                hyp.insert(rng.randrange(len(hyp) + 1), rng.choice(WORDS))
            elif len(hyp) > 4:  # >= 4 words: see test_bleu_differs_for_short_hypotheses
                del hyp[rng.randrange(len(hyp))]
        while len(hyp) < 4:
            hyp.insert(rng.randrange(len(hyp) + 1), rng.choice(WORDS))
        refs.append(image_refs)
        hyps.append(hyp)
    return refs, hyps


def test_bleu_equals_pycocoevalcap_on_a_realistic_corpus():
    refs, hyps = realistic_corpus()
    ours, coco = bleu(refs, hyps), coco_bleu(refs, hyps)
    assert 20 < ours["bleu4"] < 95  # a corpus where every n-gram order has matches
    for n in range(1, 5):
        assert ours[f"bleu{n}"] == pytest.approx(coco[f"bleu{n}"], abs=1e-6)


def test_bleu_differs_for_short_hypotheses():
    # a 2-word hypothesis has no trigram: nltk counts 0 matches of max(1, 0) = 1 guesses,
    # pycocoevalcap 0 of 0; BLEU-1/2 agree, BLEU-3/4 differ (documented in metrics.py)
    refs = [[toks("a b c d e")], [toks("a b c d e")]]
    hyps = [toks("a b c d e"), ["a", "b"]]
    bp = math.exp(1 - 10 / 7)
    ours, coco = bleu(refs, hyps), coco_bleu(refs, hyps)
    assert ours["bleu2"] == pytest.approx(100 * bp) and coco["bleu2"] == pytest.approx(100 * bp)
    assert coco["bleu4"] == pytest.approx(100 * bp)  # p3 = 3/3, p4 = 2/2
    assert ours["bleu4"] == pytest.approx(100 * bp * (3 / 4 * 2 / 3) ** 0.25)  # p3 3/4, p4 2/3


def test_bleu_hand_computed_one_sentence():
    ref = [[toks("the cat is on the mat")]]
    hyp = [toks("the cat sat on the mat")]
    # clipped precisions p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3; same length: BP = 1
    out = bleu(ref, hyp)
    assert out["bleu1"] == pytest.approx(100 * 5 / 6)
    assert out["bleu2"] == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5))
    assert out["bleu3"] == pytest.approx(50.0)
    assert out["bleu4"] == pytest.approx(0.0, abs=1e-70)
    # the one documented difference: pycocoevalcap smooths a zero count with 1e-15/1e-9
    coco = coco_bleu(ref, hyp)
    assert coco["bleu3"] == pytest.approx(50.0)
    assert 0 < coco["bleu4"] < 0.01


def test_bleu_brevity_penalty_perfect_and_disjoint():
    ref = [[toks("the cat is on the mat")]]
    short = bleu(ref, [["the", "cat"]])
    assert short["bleu2"] == pytest.approx(100 * math.exp(1 - 6 / 2))  # p1 = p2 = 1, BP = e^-2
    perfect = bleu([[toks("a big red circle"), toks("a circle")]],
                   [toks("a big red circle")])
    assert all(v == pytest.approx(100.0) for v in perfect.values())
    none = bleu([[toks("a red circle")]], [toks("two blue squares")])
    assert all(v == pytest.approx(0.0, abs=1e-70) for v in none.values())
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        bleu(ref, [["a"], ["b"]])


def test_coco_scores_perfect_disjoint_and_meteor():
    refs, _ = realistic_corpus(n_images=8, seed=1)
    perfect = [r[0] for r in refs]
    out = coco_scores(refs, perfect, meteor=True)
    assert out["rougeL"] > 95  # exact copy of one reference (others differ a little)
    assert out["cider"] > 100
    if out["meteor"] is not None:  # Java present
        assert 50 < out["meteor"] <= 100
    disjoint = coco_scores(refs, [["zebra", "xylophone"]] * len(refs), meteor=False)
    assert disjoint["cider"] == 0.0 and disjoint["rougeL"] == 0.0
    assert disjoint["meteor"] is None
    same = coco_scores([[["a", "red", "circle"]]] * 3, [["a", "red", "circle"]] * 3,
                       meteor=False)
    assert same["rougeL"] == pytest.approx(100.0)


def test_meteor_without_java_is_none_with_one_message(monkeypatch, capsys):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    out = coco_scores([[["a", "red", "circle"]]], [["a", "red", "circle"]])
    assert out["meteor"] is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "java" in err


# -- semantic F1 --------------------------------------------------------------------------

RED_CIRCLE = {"shape": "circle", "colour": "red", "size": "big", "box": [0, 0, 64, 64]}
BLUE_SQUARE = {"shape": "square", "colour": "blue", "size": "small", "box": [160, 160, 224, 224]}
RED_CIRCLE_2 = {"shape": "circle", "colour": "red", "size": "small", "box": [160, 0, 224, 64]}


def test_semantic_f1_hand_made_scenes():
    scene = [RED_CIRCLE, BLUE_SQUARE]
    assert semantic_f1([toks("a big red circle left of a small blue square")], [scene]) == 1.0
    # one of two found: TP 1, FN 1 -> 2 / 3
    assert semantic_f1([["a", "red", "circle"]], [scene]) == pytest.approx(2 / 3)
    assert semantic_f1([["a", "green", "triangle"]], [scene]) == 0.0
    # multisets: one red circle said twice -> TP 1, FP 1
    assert semantic_f1([toks("a red circle and a red circle")], [[RED_CIRCLE]]) == \
        pytest.approx(2 / 3)
    # micro average over images: TP 1 + 2, FP 0, FN 1 + 0
    f1 = semantic_f1([["a", "red", "circle"], toks("a red circle and a red circle")],
                     [scene, [RED_CIRCLE, RED_CIRCLE_2]])
    assert f1 == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))


# -- grounding ----------------------------------------------------------------------------

def alpha_on(cells, T=4, P=49):
    """(T, P) attention: every word puts the given {cell: mass} distribution."""
    a = torch.zeros(T, P)
    for cell, mass in cells.items():
        a[:, cell] = mass
    return a


def test_grounding_all_none_half():
    words = [["a", "big", "red", "circle"]]
    scene = [[RED_CIRCLE]]  # box 0..64 px: cells (0,0) (0,1) (1,0) (1,1) = 0, 1, 7, 8
    assert grounding(words, [alpha_on({0: 0.5, 8: 0.5})], scene) == pytest.approx(1.0)
    assert grounding(words, [alpha_on({48: 1.0})], scene) == pytest.approx(0.0)
    assert grounding(words, [alpha_on({1: 0.5, 40: 0.3, 48: 0.2})], scene) == pytest.approx(0.5)
    assert grounding(words, [alpha_on({1: 0.5, 40: 0.3, 48: 0.2})], scene,
                     method="argmax") == 1.0
    assert grounding(words, [alpha_on({1: 0.4, 48: 0.6})], scene, method="argmax") == 0.0
    # (T, grid, grid) maps are accepted too
    assert grounding(words, [alpha_on({7: 1.0}).view(4, 7, 7)], scene) == pytest.approx(1.0)


def test_grounding_selection_skips_and_average():
    scene = [RED_CIRCLE, BLUE_SQUARE, RED_CIRCLE_2]
    words = toks("a blue square left of a red circle")
    a = torch.zeros(len(words), 49)  # (T, P)
    a[:, 48] = 1.0  # "square" (index 2) looks at the blue square: 1.0
    a[7, :] = 0.0
    a[7, 6] = 0.75  # "circle": 0.75 on the second red circle (cell 6), 0.25 on the first
    a[7, 0] = 0.25
    report = grounding_report([words], [a], [scene])
    assert report["words"] == 2 and report["skipped"] == 0
    assert report["mass"] == pytest.approx((1.0 + 0.75) / 2)
    assert report["argmax"] == 1.0
    # the size word narrows the choice: "small red circle" is RED_CIRCLE_2 only
    words2 = toks("a small red circle")
    a2 = alpha_on({0: 1.0})  # looks at the big one
    assert grounding([words2], [a2], [scene]) == 0.0
    # a shape the scene does not have is skipped and counted
    report = grounding_report([["a", "green", "triangle"]], [alpha_on({0: 1.0}, T=3)], [scene])
    assert report == {"mass": 0.0, "argmax": 0.0, "words": 0, "skipped": 1}
    with pytest.raises(ValueError, match="method"):
        grounding([words2], [a2], [scene], method="max")
    with pytest.raises(ValueError, match="attention"):
        grounding([words2], [torch.zeros(2, 49)], [scene])


def test_mention_errors_name_what_semantic_f1_counts():
    scene = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}]
    caption = "a red circle and a red circle and a green square"
    wrong, missed = mention_errors(caption, scene)
    assert wrong == [("green", "square"), ("red", "circle")]  # the repeat is a false positive
    assert missed == [("blue", "square")]
    assert mention_errors(caption.split(), scene) == (wrong, missed)  # tokens as well
    assert mention_errors("a blue square left of a red circle", scene) == ([], [])
    # one TP, two FP, one FN: the same counts as F1 = 2 / (2 + 2 + 1)
    assert semantic_f1([caption.split()], [scene]) == pytest.approx(2 / 5)
