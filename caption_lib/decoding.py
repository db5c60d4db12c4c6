"""Turning a trained decoder into captions: greedy decoding and batched beam search.

Xu et al. 2015 (Sec. 5.2) caption test images with beam search. Given the region features
`a` of an image, we look for the word sequence y_1 .. y_T (ending with <end>) that makes
log p(y | a) = sum_t log p(y_t | y_<t, a) large:

- greedy decoding takes the most likely word at every step;
- beam search keeps the k most likely prefixes ("beams") at every step, extends each by
  every word of the vocabulary, keeps the k best of the k*V candidates, and sets aside the
  hypotheses that end with <end>. With `length_norm` the finished hypotheses are ranked
  by sum log p / length^alpha (plain sums favour short captions).

Both run over a BATCH of images at once: the B*k beams are one batch for the decoder's
`step`, and the image projection W_a a (attention) is computed once per image and repeated
for its beams. The features themselves are not repeated: the beams read them through
`recurrent.RepeatedRows`, so each step's context reads one copy per image. If no beam
emits <end> within `max_len` steps, the best unfinished beam is returned (the popular
tutorial crashes there). Beam size 1 gives exactly greedy decoding.

The decoder is anything with the `DecoderWithAttention` decoding interface:
`init_state(features) -> (h, c)`, `project(features)` (or `attention.project`), and
`step(tokens, state, features, projected) -> (logits, state, alpha)`, where a beam
search passes `features` as a `recurrent.RepeatedRows` (its `.prefix(rows)` gives the
(rows, P, E) tensor); a `Captioner` (which has `.decoder`) works too.

Shapes: B images, k beams per image, P regions (49), E encoder dim (2048), H decoder dim,
A attention dim, V vocabulary size, T decoding steps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from caption_lib.recurrent import RepeatedRows

MAX_LEN = 20  # the longest caption decoded, in steps (words + <end>): the one default
PRECISIONS = ("fp32", "bf16")  # what a search runs in (`_in_precision`)
State = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Hypothesis:
    """One finished (or, as a fallback, unfinished) beam of one image."""

    tokens: list[int]  # word ids, without <start>/<end>
    score: float  # sum of log-probabilities (incl. that of <end> when finished)
    norm_score: float  # score / length**alpha (== score without length normalisation)
    alphas: torch.Tensor  # (len(tokens), P) attention of each word
    finished: bool  # False: cut at max_len without <end>


@dataclass
class DecodeResult:
    """What `greedy_decode` and `beam_search` return for a batch of B images.

    Attributes:
        tokens: B lists of word ids, without <start>, <end> or padding.
        scores: (B,) sum of the log-probabilities of the chosen sequences (including the
            log-probability of <end> when the sequence ended).
        alphas: B tensors (len(tokens[i]), P): the attention of each emitted word (the
            step that emitted <end> is left out, so row j belongs to word j).
        norm_scores: (B,) the length-normalised scores used to rank finished hypotheses
            (beam search with `length_norm`), else None.
        finished: (B,) bool, False where no <end> came within `max_len` (fallback).
        beams: with `return_beams=True`, per image all hypotheses collected, best first.
    """

    tokens: list[list[int]]
    scores: torch.Tensor
    alphas: list[torch.Tensor]
    norm_scores: torch.Tensor | None = None
    finished: torch.Tensor | None = None
    beams: list[list[Hypothesis]] | None = field(default=None, repr=False)


def _unwrap(decoder: Any) -> nn.Module:
    """The decoder itself when given a `Captioner` (anything with `.decoder`)."""
    inner = getattr(decoder, "decoder", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "step") else decoder


def _special_ids(start_id: Any, end_id: int | None) -> tuple[int, int]:
    """Accept either two ints or a `Vocabulary` (with start_id/end_id) as `start_id`."""
    if hasattr(start_id, "start_id") and hasattr(start_id, "end_id"):
        if end_id is not None:
            raise TypeError("with a Vocabulary, pass the other arguments by keyword "
                            "(e.g. max_len=20), not end_id")
        return int(start_id.start_id), int(start_id.end_id)
    if end_id is None:
        raise TypeError("give start_id and end_id, or a Vocabulary as start_id")
    return int(start_id), int(end_id)


def _project(decoder: nn.Module, features: torch.Tensor) -> torch.Tensor | None:
    """W_a a once per image: (B, P, A), or None for a decoder without attention."""
    if hasattr(decoder, "project"):
        return decoder.project(features)  # (B, P, A) or None
    attention = getattr(decoder, "attention", None)
    return attention.project(features) if attention is not None else None  # (B, P, A)


def _length_alpha(length_norm: bool | float) -> float:
    """The exponent alpha of the length penalty; 0 means no normalisation."""
    if length_norm is True:
        return 1.0
    if length_norm is False or length_norm is None:
        return 0.0
    return float(length_norm)


class _eval_mode:
    """Context: module in eval mode and no autograd, training flag restored after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.grad = torch.no_grad()

    def __enter__(self) -> None:
        self.was_training = self.module.training
        self.module.eval()
        self.grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.grad.__exit__(*exc)
        self.module.train(self.was_training)


def _step_options(decoder: nn.Module) -> dict:
    """Keyword arguments for every `step` of one search: the decoder's arranged weights
    (`DecoderWithAttention.prepare`), made once per search instead of once per step."""
    return {"loop": decoder.prepare()} if hasattr(decoder, "prepare") else {}


def _in_precision(decoder: nn.Module, features: torch.Tensor, precision: str
                  ) -> tuple[nn.Module, torch.Tensor]:
    """The decoder and (B, P, E) features a search runs on: the given ones ("fp32"), or
    bf16 copies ("bf16": every product and the LSTM state in bfloat16, faster on a CPU
    with AVX512-BF16: `ratio_bf16_over_fp32_batched` in benchmarks/results/beam.json;
    log-probabilities, scores and attention (its scores: `Attention._scores_in_chunks`)
    stay fp32). The caller's decoder is not changed."""
    if precision == "fp32":
        return decoder, features
    if precision != "bf16":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    low = copy.deepcopy(decoder).to(torch.bfloat16)  # one copy per search
    return low, features.to(torch.bfloat16)  # (B, P, E)


def _check_features(features: torch.Tensor, max_len: int) -> None:
    if features.dim() != 3:
        raise ValueError(f"features must be (B, P, E), got {tuple(features.shape)}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")


def greedy_decode(
    decoder: nn.Module,
    features: torch.Tensor,
    start_id: int | Any,
    end_id: int | None = None,
    max_len: int = MAX_LEN,
    precision: str = "fp32",
) -> DecodeResult:
    """Most likely word at every step, for a batch of images.

    Args:
        decoder: a `DecoderWithAttention` (or a `Captioner`).
        features: (B, P, E) region features, on the decoder's device.
        start_id, end_id: ids of <start> and <end> (or pass a `Vocabulary` as `start_id`).
        max_len: at most this many steps; a caption without <end> has max_len words.
        precision: "fp32", or "bf16" (a bf16 copy of the decoder runs the steps: faster
            on CPUs with AVX512-BF16; not measured on a GPU yet; may pick other words where
            two are nearly tied).

    Returns:
        `DecodeResult` (tokens, sum log-prob scores, per-word alphas, finished flags).
    """
    _check_features(features, max_len)
    decoder, features = _in_precision(_unwrap(decoder), features, precision)
    start_id, end_id = _special_ids(start_id, end_id)
    B = features.size(0)
    with _eval_mode(decoder):
        projected = _project(decoder, features)  # (B, P, A) or None
        state = decoder.init_state(features)  # (B, H), (B, H)
        tokens = torch.full((B,), start_id, dtype=torch.long, device=features.device)  # (B,)
        captions = _GreedyCaptions(B, max_len, end_id, features.device)
        continue_greedy(decoder, features, projected, _step_options(decoder), captions,
                        torch.arange(B, device=features.device), state, tokens, 0)
    return captions.result()


class _GreedyCaptions:
    """The greedy captions of B images, written one step at a time.

    Each image's caption may be at its own step: `take` gets rows of some images (their
    next-word log-probs and attention) and the step t of each, picks the most likely word,
    and adds its log-prob to the score until the caption has emitted <end>."""

    def __init__(self, B: int, max_len: int, end_id: int, device: torch.device) -> None:
        self.max_len, self.end_id = max_len, end_id
        self.words = torch.zeros(B, max_len, dtype=torch.long, device=device)  # (B, T)
        self.alphas: torch.Tensor | None = None  # (B, T, P), made at the first step
        self.scores = torch.zeros(B, device=device)  # (B,) sum of log-probs
        self.done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) emitted <end>
        self.lengths = torch.full((B,), max_len, dtype=torch.long, device=device)  # (B,)

    def take(self, images: torch.Tensor, logp: torch.Tensor, alpha: torch.Tensor,
             t: torch.Tensor | int) -> torch.Tensor:
        """Rows of `images` (R,) at steps `t` (R,): logp (R, V), alpha (R, P) -> words (R,)."""
        if self.alphas is None:
            self.alphas = alpha.new_zeros(self.words.size(0), self.max_len, alpha.size(-1),
                                          dtype=torch.float32)  # (B, T, P)
        best, tokens = logp.max(dim=-1)  # (R,), (R,)
        live = ~self.done[images]  # (R,)
        self.scores[images] += torch.where(live, best, torch.zeros_like(best))
        self.words[images, t] = tokens
        self.alphas[images, t] = alpha.float()
        ended = tokens.eq(self.end_id) & live  # (R,)
        t = torch.as_tensor(t, device=images.device).expand_as(images)  # (R,)
        self.lengths[images[ended]] = t[ended]
        self.done[images[ended]] = True
        return tokens

    def result(self) -> DecodeResult:
        words, lengths = self.words.cpu(), self.lengths.tolist()
        alphas = self.alphas.cpu() if self.alphas is not None else None  # (B, T, P)
        return DecodeResult(
            tokens=[words[b, :n].tolist() for b, n in enumerate(lengths)],
            scores=self.scores.cpu(),
            alphas=[alphas[b, :n] for b, n in enumerate(lengths)],
            norm_scores=None,
            finished=self.done.cpu(),
        )


def continue_greedy(decoder: nn.Module, features: torch.Tensor, projected: torch.Tensor | None,
                    options: dict, captions: _GreedyCaptions, images: torch.Tensor,
                    state: State, tokens: torch.Tensor, t: torch.Tensor | int) -> None:
    """Greedy steps for the captions of `images` (R,) until each ends or has max_len
    steps. Each row starts from its own state (R, H) x2, last word `tokens` (R,) and step
    `t` (R,) or int; `features` (B, P, E) and `projected` (B, P, A) are per image. A row
    leaves the batch when its caption is done."""
    t = torch.as_tensor(t, device=images.device).expand_as(images).clone()  # (R,)
    feats, proj = features[images], projected[images] if projected is not None else None
    while images.numel():
        logits, state, alpha = decoder.step(tokens, state, feats, proj, **options)  # (R, V)
        tokens = captions.take(images, F.log_softmax(logits.float(), dim=-1), alpha, t)
        t += 1
        keep = ~captions.done[images] & (t < captions.max_len)  # (R,)
        if not bool(keep.all()):
            images, tokens, t = images[keep], tokens[keep], t[keep]
            state, feats = (state[0][keep], state[1][keep]), feats[keep]
            proj = proj[keep] if proj is not None else None


def beam_search(
    decoder: nn.Module,
    features: torch.Tensor,
    start_id: int | Any,
    end_id: int | None = None,
    beam_size: int = 3,
    max_len: int = MAX_LEN,
    length_norm: bool | float = True,
    return_beams: bool = False,
    keep_greedy: bool = True,
    precision: str = "fp32",
) -> DecodeResult:
    """Beam search over a batch of images at once (k = `beam_size` beams per image).

    At each step the B*k live beams go through `decoder.step` as one batch; per image the
    2k best of the k*V extensions (ranked by sum log-prob) are taken: those that end with
    <end> and rank among the first k are set aside as finished hypotheses, the k best
    others live on. An image is done when it has k finished hypotheses, or (without length
    normalisation) when its best finished score beats every live beam (log-probs only
    fall, so nothing better can come). If an image has no finished hypothesis after
    `max_len` steps, its best live beam is returned (the `finished` flag says so).

    Args:
        decoder: a `DecoderWithAttention` (or a `Captioner`).
        features: (B, P, E) region features, on the decoder's device.
        start_id, end_id: ids of <start> and <end> (or a `Vocabulary` as `start_id`).
        beam_size: k; 1 gives exactly `greedy_decode`.
        max_len: at most this many steps (words + <end>).
        length_norm: rank finished hypotheses by score / length**alpha, length counting
            <end>; True means alpha = 1 (mean log-prob per word), a float sets alpha,
            False ranks by the plain sum.
        return_beams: also return every collected hypothesis per image (`.beams`).
        keep_greedy: also rank the greedy caption, so that the result never ranks below
            a finished greedy caption; beam search alone can lose it when its prefix
            falls out of the beam. It is read off the beams while its prefix is one of
            them, and takes steps of its own only after that (`_GreedyInBeam`).
        precision: "fp32", or "bf16" (see `greedy_decode`).

    Returns:
        `DecodeResult` with the best hypothesis of each image.
    """
    _check_features(features, max_len)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    decoder, features = _in_precision(_unwrap(decoder), features, precision)
    start_id, end_id = _special_ids(start_id, end_id)
    alpha_len = _length_alpha(length_norm)
    with _eval_mode(decoder):
        beams = _Beams.start(decoder, features, start_id, beam_size, alpha_len)
        greedy = _GreedyInBeam(beams, max_len, end_id) if keep_greedy and beam_size > 1 else None
        _search(decoder, beams, greedy, max_len, end_id)
        beams.fall_back()
        if greedy is not None:
            greedy.finish(decoder, features, beams)
    finished = beams.finished
    if greedy is not None:
        _add_greedy(finished, greedy.captions.result(), beams.normalise)
    for hyps in finished:
        hyps.sort(key=lambda hyp: hyp.norm_score, reverse=True)
    best = [hyps[0] for hyps in finished]
    return DecodeResult(
        tokens=[hyp.tokens for hyp in best],
        scores=torch.tensor([hyp.score for hyp in best]),
        alphas=[hyp.alphas for hyp in best],
        norm_scores=torch.tensor([hyp.norm_score for hyp in best]) if alpha_len else None,
        finished=torch.tensor([hyp.finished for hyp in best]),
        beams=finished if return_beams else None,
    )


def _search(decoder: nn.Module, beams: _Beams, greedy: _GreedyInBeam | None, max_len: int,
            end_id: int) -> None:
    """The steps of `beam_search`: the B*k beams (and the R greedy captions riding with
    them) through one `decoder.step` per step, until every image is done or max_len."""
    for t in range(max_len):
        riders = greedy.riders(beams) if greedy is not None else None
        logits, state, alpha = beams.step(decoder, t, riders)  # (B*k [+ R], V), ...
        logp = F.log_softmax(logits.float(), dim=-1)  # (B*k [+ R], V)
        n = beams.tokens.size(0)  # B*k beam rows; the R riders' rows follow
        if greedy is not None:
            greedy.observe(logp[:n], alpha[:n], t)
            greedy.ride(logp[n:], (state[0][n:], state[1][n:]), alpha[n:])
        state = (state[0][:n], state[1][:n])  # (B*k, H) x2: the beams'
        going = beams.extend(logp[:n], state, alpha[:n], end_id, t)
        if greedy is not None:
            greedy.follow(beams, state, t)
        if not going:
            return


@dataclass
class _Beams:
    """The search state of `beam_search`: k live beams for each of B images.

    Beam j of image b sits at row b*k + j of the (B*k, ...) tensors; `finished[b]` holds
    the hypotheses image b has set aside."""

    k: int
    alpha_len: float  # length-normalisation exponent (0: plain sums)
    features: RepeatedRows  # (B, P, E) standing for (B*k, P, E): each image's, per beam
    projected: torch.Tensor | None  # (B*k, P, A) W_a a, computed once per image
    options: dict  # `step`'s keyword arguments for this search (`_step_options`)
    state: State  # (h, c), each (B*k, H)
    tokens: torch.Tensor  # (B*k,) the last word of each beam
    scores: torch.Tensor  # (B, k) sum of log-probs of each beam
    history: torch.Tensor  # (B*k, t) the words so far
    attn: torch.Tensor  # (B*k, t, P) their attention
    active: torch.Tensor  # (B,) bool, image still searching
    n_finished: torch.Tensor  # (B,) hypotheses set aside
    best_finished: torch.Tensor  # (B,) best finished sum log-prob
    finished: list[list[Hypothesis]]
    src: torch.Tensor | None = None  # (B*k,) the rows the live beams continue (last step)

    @classmethod
    def start(cls, decoder: nn.Module, features: torch.Tensor, start_id: int, k: int,
              alpha_len: float) -> _Beams:
        """k copies of <start> per image; only beam 0 may be extended at the first step."""
        B, P, _ = features.shape
        device = features.device
        projected = _project(decoder, features)  # (B, P, A) or None
        h, c = decoder.init_state(features)  # (B, H), (B, H)
        scores = torch.full((B, k), float("-inf"), device=device)  # (B, k)
        scores[:, 0] = 0.0  # all k beams start identical
        return cls(
            k=k, alpha_len=alpha_len, features=RepeatedRows(features, k),
            projected=projected.repeat_interleave(k, dim=0) if projected is not None else None,
            options=_step_options(decoder),
            state=(h.repeat_interleave(k, dim=0), c.repeat_interleave(k, dim=0)),
            tokens=torch.full((B * k,), start_id, dtype=torch.long, device=device),
            scores=scores, history=torch.empty(B * k, 0, dtype=torch.long, device=device),
            attn=torch.empty(B * k, 0, P, device=device),
            active=torch.ones(B, dtype=torch.bool, device=device),
            n_finished=torch.zeros(B, dtype=torch.long, device=device),
            best_finished=torch.full((B,), float("-inf"), device=device),
            finished=[[] for _ in range(B)])

    def step(self, decoder: nn.Module, t: int, riders: _Riders | None = None) -> tuple:
        """`decoder.step` of the B*k beams: (B*k, V) logits, state, (B*k, P) alpha; with
        `riders`, their R rows follow the beams' in one batch: (B*k + R, ...). At the
        first step an image's k beams are still identical (and nothing rides yet): one row
        per image is computed (on the features themselves, (B, P, E)) and repeated k times."""
        if riders is not None:
            tokens = torch.cat([self.tokens, riders.tokens])  # (B*k + R,)
            state = tuple(torch.cat([s, r]) for s, r in zip(self.state, riders.state))
            return decoder.step(tokens, state, riders.features, riders.projected,
                                **self.options)
        if t > 0 or self.k == 1:
            return decoder.step(self.tokens, self.state, self.features, self.projected,
                                **self.options)
        k = self.k
        logits, state, alpha = decoder.step(
            self.tokens[::k], (self.state[0][::k], self.state[1][::k]), self.features.x,
            self.projected[::k] if self.projected is not None else None, **self.options)
        return (logits.repeat_interleave(k, dim=0),  # (B*k, V)
                tuple(x.repeat_interleave(k, dim=0) for x in state),  # (B*k, H) x2
                alpha.repeat_interleave(k, dim=0))  # (B*k, P)

    def normalise(self, score: float, length: int) -> float:
        return score / (length ** self.alpha_len) if self.alpha_len else score

    def extend(self, logp: torch.Tensor, state: State, alpha: torch.Tensor, end_id: int,
               t: int) -> bool:
        """Step t: keep the 2k best extensions per image of the beams' next-word
        log-probs `logp` (B*k, V), set aside those that end, let the k best others live
        on (`src`: the rows they continue). Returns False when every image is done."""
        B, k = self.scores.shape
        V = logp.size(-1)
        n_cand = min(2 * k, k * V)
        cand = (self.scores.unsqueeze(2) + logp.view(B, k, V)).view(B, k * V)  # (B, k*V)
        top_scores, top_idx = cand.topk(n_cand, dim=1)  # (B, 2k), (B, 2k)
        top_beam = torch.div(top_idx, V, rounding_mode="floor")  # (B, 2k)
        top_word = top_idx % V  # (B, 2k)
        is_end = top_word.eq(end_id)  # (B, 2k)
        self.attn = torch.cat([self.attn, alpha.float().unsqueeze(1)], dim=1)  # (B*k, t+1, P)
        rank = torch.arange(n_cand, device=logp.device).unsqueeze(0)  # (1, 2k)
        self._set_aside(top_scores, top_beam, is_end & (rank < k), t)
        # the k best candidates that do not end live on
        order = torch.where(is_end, rank + n_cand, rank)  # (B, 2k) push <end> back
        keep = order.argsort(dim=1)[:, :k]  # (B, k)
        self.scores = top_scores.gather(1, keep)  # (B, k)
        # no <end> in a row of 2k >= k+1 candidates when only k can end: keep is valid
        offsets = (torch.arange(B, device=logp.device) * k).unsqueeze(1)  # (B, 1)
        src = (offsets + top_beam.gather(1, keep)).view(-1)  # (B*k,) rows to continue
        self.src = src
        self.tokens = top_word.gather(1, keep).view(-1)  # (B*k,)
        self.history = torch.cat([self.history[src], self.tokens.unsqueeze(1)], dim=1)
        self.attn = self.attn[src]  # (B*k, t+1, P)
        self.state = (state[0][src], state[1][src])  # (B*k, H) x2
        # which images are done: k hypotheses, or (plain sums) none can be beaten
        done = self.n_finished >= k  # (B,)
        if not self.alpha_len:
            done |= self.best_finished >= self.scores.max(dim=1).values  # (B,)
        self.active &= ~done
        return bool(self.active.any())

    def _set_aside(self, top_scores: torch.Tensor, top_beam: torch.Tensor,
                   ends_in_top_k: torch.Tensor, t: int) -> None:
        """The finished hypotheses of step t: an <end> among an active image's k best."""
        take = ends_in_top_k & self.active.unsqueeze(1) & top_scores.isfinite()  # (B, 2k)
        if not bool(take.any()):
            return
        self.n_finished += take.sum(dim=1)  # (B,)
        ended = torch.where(take, top_scores, torch.full_like(top_scores, -torch.inf))
        self.best_finished = torch.maximum(self.best_finished, ended.max(dim=1).values)
        for b, j in take.nonzero().tolist():
            row = b * self.k + int(top_beam[b, j])
            score = float(top_scores[b, j])
            self.finished[b].append(Hypothesis(
                tokens=self.history[row].tolist(), score=score,
                norm_score=self.normalise(score, t + 1),
                alphas=self.attn[row, :t].cpu(), finished=True))

    def fall_back(self) -> None:
        """Images without any finished hypothesis take their best live beam."""
        steps = self.history.size(1)
        for b, hyps in enumerate(self.finished):
            if hyps:
                continue
            j = int(self.scores[b].argmax())
            row = b * self.k + j
            score = float(self.scores[b, j])
            hyps.append(Hypothesis(tokens=self.history[row].tolist(), score=score,
                                   norm_score=self.normalise(score, steps),
                                   alphas=self.attn[row, :steps].cpu(), finished=False))


@dataclass
class _Riders:
    """What the greedy captions riding along with the beams give one beam step: their
    last words (R,) and states (R, H) x2, the features of the beams and riders
    (`RepeatedRows`, B*k + R rows) and their projection (B*k + R, P, A) or None."""

    tokens: torch.Tensor
    state: State
    features: RepeatedRows
    projected: torch.Tensor | None


class _GreedyInBeam:
    """The greedy caption of each image, read off the beams while it is one of them.

    Greedy decoding's prefix starts as beam 0 of its image. As long as it is a live beam,
    its next word is the argmax of that beam's row, which the search computed anyway; so
    the greedy caption costs nothing. When its extension is not among the k kept beams,
    the prefix leaves with its state and "rides along": from the next step its row
    follows the B*k beam rows in the same `decoder.step` (`riders`, `ride`), so the
    decoder's weights are read once per step for both (the step's products are bound by
    reading them at these sizes: 96 + 32 rows cost about 15 % less than two passes,
    benchmarks/bench_beam.py). What is left when the search stops is finished with
    greedy steps of its own (`finish`, `continue_greedy`). In all, beam search with
    `keep_greedy` costs less than beam search plus a separate `greedy_decode`, and returns
    the same greedy caption."""

    def __init__(self, beams: _Beams, max_len: int, end_id: int) -> None:
        B, k = beams.scores.shape
        device = beams.tokens.device
        self.k = k
        self.captions = _GreedyCaptions(B, max_len, end_id, device)
        self.row = torch.arange(B, device=device) * k  # (B,) its beam row; -1: not followed
        self.last = beams.tokens[self.row].clone()  # (B,) its last word
        # the riders: images (R,), their states (R, H) x2, last words (R,), steps (R,)
        self.images = torch.zeros(0, dtype=torch.long, device=device)  # (R,)
        self.state: State = (beams.state[0][:0], beams.state[1][:0])  # (R, H) x2
        self.tokens = self.images.clone()  # (R,)
        self.t = self.images.clone()  # (R,)
        self._inputs: tuple | None = None  # (features, projected) of the current riders
        self.joined = self.outlived = 0  # prefixes that left mid-search / outlived it

    def riders(self, beams: _Beams) -> _Riders | None:
        """The riders' part of the next beam step, or None when none rides."""
        if not self.images.numel():
            return None
        if self._inputs is None:  # the set of riders changed: gather their inputs once
            projected = beams.projected
            if projected is not None:  # (B*k, P, A): an image's rows are alike
                projected = torch.cat([projected, projected[self.images * self.k]])
            self._inputs = (RepeatedRows(beams.features.x, self.k, self.images), projected)
        return _Riders(self.tokens, self.state, *self._inputs)

    def observe(self, logp: torch.Tensor, alpha: torch.Tensor, t: int) -> None:
        """Step t of the followed prefixes: logp (B*k, V), alpha (B*k, P) of the beams."""
        images = (self.row >= 0).nonzero().squeeze(1)  # (R,)
        if images.numel():
            rows = self.row[images]  # (R,)
            self.last[images] = self.captions.take(images, logp[rows], alpha[rows], t)

    def ride(self, logp: torch.Tensor, state: State, alpha: torch.Tensor) -> None:
        """The riders' step: logp (R, V), state (R, H) x2, alpha (R, P) of their rows.
        A rider gets off when its caption has ended or has `max_len` words."""
        if not self.images.numel():
            return
        self.tokens = self.captions.take(self.images, logp, alpha, self.t)  # (R,)
        self.state, self.t = state, self.t + 1
        keep = ~self.captions.done[self.images] & (self.t < self.captions.max_len)  # (R,)
        if not bool(keep.all()):
            self._keep_only(keep)

    def follow(self, beams: _Beams, state: State, t: int) -> None:
        """After `beams.extend`: find each followed prefix among the kept beams, or let
        it leave with the state (B*k, H) x2 its row has after step t."""
        B, k = beams.scores.shape
        followed = (self.row >= 0) & ~self.captions.done  # (B,)
        same = (beams.src.view(B, k) == self.row.unsqueeze(1)) \
            & (beams.tokens.view(B, k) == self.last.unsqueeze(1))  # (B, k)
        kept = same.any(dim=1) & followed  # (B,)
        self.joined += self._leave(followed & ~kept, state, self.row, t + 1)
        new_row = torch.arange(B, device=same.device) * k + same.int().argmax(dim=1)  # (B,)
        self.row = torch.where(kept, new_row, torch.full_like(new_row, -1))

    def _leave(self, which: torch.Tensor, state: State, rows: torch.Tensor, t: int) -> int:
        """The prefixes of images `which` (B,) bool, at beam `rows` (B,), leave the beams
        after step t - 1 and ride from step t; returns how many."""
        images = which.nonzero().squeeze(1)  # (R',)
        if not images.numel() or t >= self.captions.max_len:
            return 0
        r = rows[images]  # (R',)
        self.images = torch.cat([self.images, images])  # (R + R',)
        self.state = tuple(torch.cat([mine, new[r]]) for mine, new in zip(self.state, state))
        self.tokens = torch.cat([self.tokens, self.last[images]])  # (R + R',)
        self.t = torch.cat([self.t, torch.full_like(images, t)])  # (R + R',)
        self._inputs = None  # the set of riders changed
        return images.numel()

    def _keep_only(self, keep: torch.Tensor) -> None:
        """Only the riders of `keep` (R,) bool ride on."""
        self.images, self.tokens, self.t = self.images[keep], self.tokens[keep], self.t[keep]
        self.state = (self.state[0][keep], self.state[1][keep])  # (R'', H) x2
        self._inputs = None  # the set of riders changed

    def finish(self, decoder: nn.Module, features: torch.Tensor, beams: _Beams) -> None:
        """Continue every greedy caption that has not ended: the riders, and those still
        followed when the search stopped. `features` (B, P, E)."""
        self.outlived = self._leave(self.row >= 0, beams.state, self.row,
                                    beams.history.size(1))
        if not self.images.numel():
            return
        projected = beams.projected[::self.k] if beams.projected is not None else None
        continue_greedy(decoder, features, projected, beams.options, self.captions,
                        self.images, self.state, self.tokens, self.t)


def _add_greedy(finished: list[list[Hypothesis]], greedy: DecodeResult, normalise) -> None:
    """The greedy caption competes too: beam search can lose it (its prefix may fall out
    of the beam); so beam >= greedy, always."""
    for b, hyps in enumerate(finished):
        tokens = greedy.tokens[b]
        done = bool(greedy.finished[b])
        # as for the beams: an unfinished caption only competes when none finished
        if any(hyp.tokens == tokens for hyp in hyps) or (
                not done and any(hyp.finished for hyp in hyps)):
            continue
        score = float(greedy.scores[b])
        hyps.append(Hypothesis(tokens=tokens, score=score,
                               norm_score=normalise(score, len(tokens) + int(done)),
                               alphas=greedy.alphas[b], finished=done))


def caption_image(
    model: nn.Module,
    image: str | Path | Any,
    beam_size: int = 3,
    max_len: int = MAX_LEN,
    device: torch.device | str | None = None,
    length_norm: bool | float = True,
    image_size: int = 224,
    precision: str = "fp32",
) -> tuple[list[str], torch.Tensor]:
    """Caption one image (a PIL image of any mode, or a path) with a `Captioner`.

    The image goes through `encoder.image_transform` and the model's encoder, then
    `beam_search` (greedy when `beam_size == 1`: the same result).

    Args:
        model: a `caption_lib.model.Captioner` (with `.encoder`, `.decoder`, `.vocab`).
        image: a PIL image (any mode) or the path of an image file.
        beam_size: beams per image (1: greedy).
        max_len: at most this many steps.
        device: where to run; default: the device of the model's parameters.
        length_norm: see `beam_search`.
        image_size: side of the square the image is resized to.
        precision: the search's, "fp32" or "bf16" (see `greedy_decode`).

    Returns:
        the words (without <start>/<end>) and their attention maps (len(words), P), on CPU.

    Raises:
        CaptionLibError: the file is missing or not a readable image (names the file).
    """
    from caption_lib.annotations import load_image, to_rgb
    from caption_lib.encoder import image_transform

    image = load_image(image) if isinstance(image, (str, Path)) else to_rgb(image)  # RGB
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    x = image_transform(image_size)(image).unsqueeze(0).to(device)  # (1, 3, 224, 224)
    with _eval_mode(model):
        encode = getattr(model, "encode", model.encoder)
        features = encode(x).float()  # (1, P, E)
        vocab = model.vocab
        result = beam_search(model.decoder, features, vocab.start_id, vocab.end_id,
                             beam_size=beam_size, max_len=max_len, length_norm=length_norm,
                             precision=precision)
    # one word per id (none dropped): word j goes with attention row j
    return vocab.decode_tokens(result.tokens[0], strip=False), result.alphas[0]


def decode_batch(
    decoder: nn.Module,
    features: torch.Tensor,
    vocab: Any,
    beam_size: int = 3,
    max_len: int = MAX_LEN,
    length_norm: bool | float = True,
    precision: str = "fp32",
) -> tuple[list[list[str]], DecodeResult]:
    """Words for a batch: greedy when `beam_size == 1`, else `beam_search`."""
    if beam_size == 1:
        result = greedy_decode(decoder, features, vocab.start_id, vocab.end_id, max_len,
                               precision=precision)
    else:
        result = beam_search(decoder, features, vocab.start_id, vocab.end_id,
                             beam_size=beam_size, max_len=max_len, length_norm=length_norm,
                             precision=precision)
    # one word per id (none dropped): word j goes with attention row j
    return [vocab.decode_tokens(ids, strip=False) for ids in result.tokens], result


__all__: Sequence[str] = ["DecodeResult", "Hypothesis", "beam_search", "caption_image",
                          "decode_batch", "greedy_decode"]
