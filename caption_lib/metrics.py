"""How good are the captions? Text metrics, semantic F1 and attention grounding.

Text metrics compare a generated caption with the human references of its image, over a
whole corpus (all test images at once), multiplied by 100 as captioning papers report
them (BLEU, ROUGE-L and METEOR are then 0-100; CIDEr-D is not bounded by 100, see below):

- BLEU-n (Papineni et al. 2002): the geometric mean of the clipped n-gram precisions
  p_1..p_n, times a brevity penalty BP = min(1, exp(1 - r/c)) (c: total hypothesis length,
  r: total length of the reference closest in length to each hypothesis). Computed with
  nltk's `corpus_bleu`; it equals the `Bleu` of pycocoevalcap (the COCO evaluation code
  used by the captioning papers) on the same tokens (`tests/test_metrics.py`), with two
  edge cases where they differ: (1) a hypothesis shorter than n words adds 1 to nltk's
  n-gram count (nltk divides by max(1, #n-grams) per sentence) and 0 to pycocoevalcap's,
  so nltk's BLEU-n is lower then; (2) when a whole corpus has no n-gram match of some
  order, nltk's BLEU-n is ~0 (1e-75) and pycocoevalcap's a tiny positive number (it adds
  1e-15 to every count), e.g. 0.008 instead of 0 on the 0-100 scale.
- CIDEr-D (Vedantam et al. 2015; x100 like BLEU, but unbounded above: pycocoevalcap's
  CIDEr-D is 10 x a mean cosine similarity of tf-idf n-gram vectors, so up to 10, i.e.
  1000 after x100; captions that match their references' rarer n-grams score above 100), ROUGE-L (Lin 2004) and METEOR (Denkowski
  & Lavie 2014) from pycocoevalcap. METEOR runs a Java program: without `java` it is None.

Two measures only a data set with ground truth allows (the embedded shapes data set):

- semantic F1: the (colour, shape) pairs a caption names (`shapes.parse_mentions`) against
  the objects in the scene, as multisets, micro-averaged over the corpus (0-1);
- attention grounding: when the decoder emits the shape word of an object in the scene,
  the share of that step's attention mass on the object's cells of the 7x7 grid
  (`shapes.object_cell_mask`), averaged over all such words (0-1); or, `method="argmax"`,
  the share of those words whose most-attended region lies on the object.

Captions are lists of lower-case tokens without <start>/<end>/<pad>.
Shapes: T words of a caption, P regions (49 = grid x grid).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from collections import Counter
from collections.abc import Sequence

import torch

Tokens = Sequence[str]

BLEU_WEIGHTS = (
    (1.0, 0.0, 0.0, 0.0),
    (0.5, 0.5, 0.0, 0.0),
    (1 / 3, 1 / 3, 1 / 3, 0.0),
    (0.25, 0.25, 0.25, 0.25),
)


def _check_corpus(references: Sequence, hypotheses: Sequence) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if len(refs) == 0:
            raise ValueError(f"image {i} has no reference caption")


def bleu(references: Sequence[Sequence[Tokens]], hypotheses: Sequence[Tokens]) -> dict[str, float]:
    """Corpus BLEU-1..4 on a 0-100 scale (nltk `corpus_bleu`, no smoothing).

    Args:
        references: per image, its reference captions, each a list of tokens.
        hypotheses: per image, the generated caption as a list of tokens.

    Returns:
        {"bleu1": ..., "bleu2": ..., "bleu3": ..., "bleu4": ...}.
        A corpus without any matching n-gram of some order gets ~0 (< 1e-70) for BLEU-n
        and above. See the module docstring for the differences from pycocoevalcap.
    """
    from nltk.translate.bleu_score import corpus_bleu

    _check_corpus(references, hypotheses)
    refs = [[list(r) for r in rs] for rs in references]
    hyps = [list(h) for h in hypotheses]
    out = {}
    for n, weights in enumerate(BLEU_WEIGHTS, start=1):
        with _quiet_warnings():
            out[f"bleu{n}"] = 100.0 * float(corpus_bleu(refs, hyps, weights=weights))
    return out


@contextlib.contextmanager
def _quiet_warnings():
    """nltk warns when an n-gram order has no match (the score is then 0, as documented)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _coco_inputs(references: Sequence[Sequence[Tokens]], hypotheses: Sequence[Tokens]
                 ) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """pycocoevalcap's input: {image: [space-joined lower-case captions]}."""
    gts = {i: [" ".join(t.lower() for t in r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(t.lower() for t in h)] for i, h in enumerate(hypotheses)}
    return gts, res


def coco_bleu(references: Sequence[Sequence[Tokens]], hypotheses: Sequence[Tokens]
              ) -> dict[str, float]:
    """BLEU-1..4 as pycocoevalcap computes it (0-100), for comparison with `bleu`."""
    from pycocoevalcap.bleu.bleu import Bleu

    _check_corpus(references, hypotheses)
    gts, res = _coco_inputs(references, hypotheses)
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {f"bleu{n}": 100.0 * float(s) for n, s in enumerate(scores, start=1)}


def coco_scores(references: Sequence[Sequence[Tokens]], hypotheses: Sequence[Tokens],
                meteor: bool = True) -> dict[str, float | None]:
    """CIDEr-D, ROUGE-L and METEOR from pycocoevalcap, each x100 (CIDEr-D up to 1000).

    Args:
        references: per image, its reference captions (token lists).
        hypotheses: per image, the generated caption (token list).
        meteor: compute METEOR (needs Java); when `java` is missing or METEOR fails the
            value is None and one line on stderr says why.

    Returns:
        {"cider": ..., "rougeL": ..., "meteor": ... or None}. CIDEr's idf weights come from
        the references of this corpus, so CIDEr needs more than one image to mean much.
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_corpus(references, hypotheses)
    gts, res = _coco_inputs(references, hypotheses)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    out: dict[str, float | None] = {"cider": 100.0 * float(cider), "rougeL": 100.0 * float(rouge),
                                    "meteor": None}
    if meteor:
        out["meteor"] = _meteor(gts, res)
    return out


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float | None:
    """METEOR x100 through pycocoevalcap's Java wrapper, None (and one stderr line) if not."""
    if shutil.which("java") is None:
        print("caption-lib: METEOR skipped: `java` not found (install a JRE to get it)",
              file=sys.stderr)
        return None
    scorer = None
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        with contextlib.redirect_stdout(io.StringIO()):
            scorer = Meteor()
            score, _ = scorer.compute_score(gts, res)
        return 100.0 * float(score)
    except Exception as err:  # noqa: BLE001 - any failure of the Java side means "no METEOR"
        print(f"caption-lib: METEOR skipped: {type(err).__name__}: {err}".splitlines()[0],
              file=sys.stderr)
        return None
    finally:
        if scorer is not None:
            _close_meteor(scorer)


def _close_meteor(scorer: object) -> None:
    """Stop the Java process now (pycocoevalcap only does it in __del__, which then
    finds it stopped and returns at once)."""
    proc = getattr(scorer, "meteor_p", None)
    if proc is None:
        return
    with contextlib.suppress(Exception):
        proc.stdin.close()
    with contextlib.suppress(Exception):
        proc.kill()
        proc.wait(timeout=10)


# -- shapes data set: what the caption says vs what is in the image ---------------------

def _scene_pairs(objects: Sequence[dict]) -> Counter:
    return Counter((o["colour"], o["shape"]) for o in objects)


def _said_and_truth(hypothesis: Tokens | str, objects: Sequence[dict]) -> tuple[Counter, Counter]:
    """The (colour, shape) pairs a caption names and those its scene has, as multisets."""
    from caption_lib.shapes import parse_mentions

    words = hypothesis if isinstance(hypothesis, str) else list(hypothesis)
    return Counter(parse_mentions(words)), _scene_pairs(objects)


def mention_errors(hypothesis: Tokens | str, objects: Sequence[dict]
                   ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """What one caption gets wrong about its scene, as `semantic_counts` counts it: the
    (colour, shape) pairs it names that the scene lacks (false positives) and the scene's
    pairs it does not name (false negatives), each sorted, repeats kept."""
    said, truth = _said_and_truth(hypothesis, objects)
    return sorted((said - truth).elements()), sorted((truth - said).elements())


def semantic_counts(hypotheses: Sequence[Tokens], objects_per_image: Sequence[Sequence[dict]]
                    ) -> dict[str, int]:
    """True positives, false positives and false negatives of (colour, shape) mentions."""
    if len(hypotheses) != len(objects_per_image):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(objects_per_image)} scenes")
    tp = fp = fn = 0
    for hyp, objects in zip(hypotheses, objects_per_image):
        said, truth = _said_and_truth(hyp, objects)
        hit = sum((said & truth).values())
        tp += hit
        fp += sum(said.values()) - hit
        fn += sum(truth.values()) - hit
    return {"tp": tp, "fp": fp, "fn": fn}


def semantic_f1(hypotheses: Sequence[Tokens], objects_per_image: Sequence[Sequence[dict]]
                ) -> float:
    """Micro F1 (0-1) of the (colour, shape) pairs named by the captions vs the scenes.

    Mentions and objects are multisets: "a red circle and a red circle" for a scene with
    one red circle is one true and one false positive. F1 = 2 TP / (2 TP + FP + FN);
    0.0 when there is nothing to count.
    """
    c = semantic_counts(hypotheses, objects_per_image)
    denom = 2 * c["tp"] + c["fp"] + c["fn"]
    return 2 * c["tp"] / denom if denom else 0.0


def grounding_report(hypotheses: Sequence[Tokens], alphas: Sequence[torch.Tensor],
                     objects_per_image: Sequence[Sequence[dict]], grid: int = 7,
                     image_size: int = 224) -> dict[str, float | int]:
    """Attention grounding of the shape words, both ways, with the counts behind them.

    For every emitted shape word (`shapes.SHAPES`) the object it names is found from the
    words right before it (`a [size] colour shape`): the scene's objects with that shape,
    that colour and that size (each when said). A word naming no object of the scene (a
    hallucination, which semantic F1 already penalises) is skipped and counted. When
    several objects match, the best-matching one (the largest attention share) is used.

    Args:
        hypotheses: per image, the caption's tokens.
        alphas: per image, (T, P) or (T, grid, grid) attention, row j for word j.
        objects_per_image: per image, its objects ({"shape", "colour", "size", "box"}).
        grid: the attention grid side (7: P = 49).
        image_size: the pixel size the boxes refer to.

    Returns:
        {"mass": mean attention share on the object, "argmax": share of words whose
        arg-max region is on the object, "words": words counted, "skipped": shape words
        naming no object of the scene}; mass and argmax are 0.0 when no word counts.
    """
    from caption_lib.shapes import COLOURS, SHAPES, SIZES, object_cell_mask

    if not (len(hypotheses) == len(alphas) == len(objects_per_image)):
        raise ValueError(f"{len(hypotheses)} hypotheses, {len(alphas)} attention maps and "
                         f"{len(objects_per_image)} scenes: they must match")
    mass_total, argmax_total, words, skipped = 0.0, 0, 0, 0
    for i, (hyp, alpha, objects) in enumerate(zip(hypotheses, alphas, objects_per_image)):
        hyp = [t.lower() for t in hyp]
        alpha = torch.as_tensor(alpha).float()
        alpha = alpha.reshape(len(alpha), -1 if len(alpha) else grid * grid)  # (T, P)
        if alpha.size(0) < len(hyp) or alpha.size(1) != grid * grid:
            raise ValueError(f"image {i}: attention {tuple(alpha.shape)} for {len(hyp)} "
                             f"words on a {grid}x{grid} grid")
        masks = [object_cell_mask(o, grid, image_size).flatten() for o in objects]  # (P,) each
        for j, word in enumerate(hyp):
            if word not in SHAPES:
                continue
            colour = hyp[j - 1] if j >= 1 and hyp[j - 1] in COLOURS else None
            before = j - 2 if colour else j - 1
            size = hyp[before] if before >= 0 and hyp[before] in SIZES else None
            match = [m for o, m in zip(objects, masks)
                     if o["shape"] == word and colour in (None, o["colour"])
                     and size in (None, o.get("size"))]
            if not match:
                skipped += 1
                continue
            a = alpha[j]  # (P,)
            total = float(a.sum()) or 1.0
            shares = [float(a[m].sum()) / total for m in match]
            best = max(range(len(match)), key=shares.__getitem__)
            mass_total += shares[best]
            argmax_total += int(bool(match[best][int(a.argmax())]))
            words += 1
    return {"mass": mass_total / words if words else 0.0,
            "argmax": argmax_total / words if words else 0.0,
            "words": words, "skipped": skipped}


def grounding(hypotheses: Sequence[Tokens], alphas: Sequence[torch.Tensor],
              objects_per_image: Sequence[Sequence[dict]], grid: int = 7,
              image_size: int = 224, method: str = "mass") -> float:
    """Attention grounding (0-1): see `grounding_report`; `method` is "mass" or "argmax"."""
    if method not in ("mass", "argmax"):
        raise ValueError(f"method must be 'mass' or 'argmax', got {method!r}")
    return float(grounding_report(hypotheses, alphas, objects_per_image, grid,
                                  image_size)[method])


__all__ = ["bleu", "coco_bleu", "coco_scores", "grounding", "grounding_report",
           "semantic_counts", "semantic_f1"]
