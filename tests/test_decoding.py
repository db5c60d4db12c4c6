"""Greedy decoding and batched beam search (caption_lib.decoding)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from caption_lib.decoding import DecodeResult, beam_search, greedy_decode
from caption_lib.recurrent import StepInput

PAD, START, END = 0, 1, 2


class TableDecoder(nn.Module):
    """Stand-in decoder with the decoding interface of `DecoderWithAttention`.

    The next word depends only on the previous word and the image:
    logits = table[prev] + features.mean(1) @ W, so the exact best caption of an image can
    be found by brute force. `end_bias` makes <end> more (or, negative, less) likely.
    """

    def __init__(self, vocab_size: int = 5, encoder_dim: int = 3, seed: int = 0,
                 end_bias: float = 0.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(vocab_size, vocab_size, generator=g) * 2.0  # (V, V)
        table[:, END] += end_bias
        self.register_buffer("table", table)
        self.register_buffer("W", torch.randn(encoder_dim, vocab_size, generator=g))  # (E, V)
        self.project_calls = 0

    def init_state(self, features):
        B = features.size(0)
        return features.new_zeros(B, 1), features.new_zeros(B, 1)  # (B, 1) x2

    def project(self, features):
        self.project_calls += 1
        return features.sum(dim=2, keepdim=True)  # (B, P, 1)

    def image_bias(self, features):
        return features.mean(dim=1) @ self.W  # (B, V)

    def step(self, tokens, state, features, projected):
        if isinstance(features, StepInput):  # a beam search's RepeatedRows
            features = features.prefix(tokens.size(0))  # (B, P, E)
        logits = self.table[tokens] + self.image_bias(features)  # (B, V)
        alpha = torch.softmax(projected.squeeze(2) * (1 + tokens.unsqueeze(1)), dim=1)  # (B, P)
        return logits, (state[0] + 1, state[1]), alpha

    def logp_next(self, features):
        """(B, V, V): log p(next | prev) of each image."""
        return F.log_softmax(self.table.unsqueeze(0) + self.image_bias(features)[:, None], -1)


def brute_force_best(decoder, features, max_len):
    """The best finished caption (sum log-prob) of each image by trying every sequence."""
    logp = decoder.logp_next(features)  # (B, V, V)
    V = logp.size(1)
    best = []
    for b in range(features.size(0)):
        top = (float("-inf"), None)
        for n_words in range(max_len):
            for words in itertools.product([w for w in range(V) if w != END], repeat=n_words):
                seq = [START, *words, END]
                score = sum(float(logp[b, p, n]) for p, n in itertools.pairwise(seq))
                top = max(top, (score, list(words)))
        best.append(top)
    return best


def sequence_logp(decoder, features, tokens, end=True):
    """Sum log-prob of START + tokens (+ END) under any decoder with the step interface."""
    was_training = decoder.training
    decoder.eval()
    with torch.no_grad():
        state = decoder.init_state(features)
        projected = decoder.project(features)
        seq = [START, *tokens] + ([END] if end else [])
        total = 0.0
        for prev, nxt in itertools.pairwise(seq):
            logits, state, _ = decoder.step(torch.tensor([prev]), state, features, projected)
            total += float(F.log_softmax(logits, -1)[0, nxt])
    decoder.train(was_training)
    return total


@pytest.fixture
def features():
    return torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(1))  # (B, P, E)


def test_greedy_shapes_scores_and_alphas(features):
    dec = TableDecoder(end_bias=1.0)
    out = greedy_decode(dec, features, START, END, max_len=8)
    assert isinstance(out, DecodeResult)
    assert len(out.tokens) == 4 and out.scores.shape == (4,)
    for b, toks in enumerate(out.tokens):
        assert END not in toks and START not in toks
        assert out.alphas[b].shape == (len(toks), 6)
        assert torch.allclose(out.alphas[b].sum(1), torch.ones(len(toks)), atol=1e-5)
        finished = bool(out.finished[b])
        expected = sequence_logp(dec, features[b:b + 1], toks, end=finished)
        assert out.scores[b].item() == pytest.approx(expected, abs=1e-4)
    assert dec.project_calls >= 1


def test_beam_size_one_equals_greedy(features):
    for seed in range(5):
        dec = TableDecoder(vocab_size=7, seed=seed, end_bias=0.5)
        g = greedy_decode(dec, features, START, END, max_len=10)
        b = beam_search(dec, features, START, END, beam_size=1, max_len=10, length_norm=False)
        assert b.tokens == g.tokens
        assert torch.equal(b.scores, g.scores)
        assert torch.equal(b.finished, g.finished)
        for x, y in zip(b.alphas, g.alphas):
            assert torch.equal(x, y)


def test_exhaustive_beam_finds_the_brute_force_optimum(features):
    V, T = 5, 4
    dec = TableDecoder(vocab_size=V, seed=3)
    out = beam_search(dec, features, START, END, beam_size=V ** T, max_len=T,
                      length_norm=False)
    best = brute_force_best(dec, features, max_len=T)
    for b, (score, words) in enumerate(best):
        assert out.tokens[b] == words
        assert out.scores[b].item() == pytest.approx(score, abs=1e-4)
        assert bool(out.finished[b])


def test_beam_never_below_greedy_on_model_log_probs(features):
    compared = 0
    for seed in range(8):
        dec = TableDecoder(vocab_size=8, seed=seed, end_bias=1.0)
        g = greedy_decode(dec, features, START, END, max_len=12)
        for k in (2, 3, 5):
            b = beam_search(dec, features, START, END, beam_size=k, max_len=12,
                            length_norm=False)
            for i in range(features.size(0)):
                if bool(g.finished[i]):
                    assert bool(b.finished[i])
                    assert b.scores[i].item() >= g.scores[i].item() - 1e-5
                    compared += 1
    assert compared >= 50


def test_beam_never_below_greedy_even_where_the_beam_loses_it():
    """Plain beam search can drop the greedy caption; keep_greedy makes beam >= greedy.

    The four stand-ins below are cases (found by search) where plain k=2 beam search
    returns a less probable caption than greedy decoding.
    """
    feats = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0))  # (B, P, E)
    lost = 0
    for V, end_bias, seed in [(6, 0.5, 43), (8, -0.5, 4), (8, 0.5, 33), (12, 0.0, 50)]:
        dec = TableDecoder(vocab_size=V, seed=seed, end_bias=end_bias)
        g = greedy_decode(dec, feats, START, END, max_len=10)
        ended = g.finished  # (B,) greedy captions that reached <end>
        plain = beam_search(dec, feats, START, END, beam_size=2, max_len=10,
                            length_norm=False, keep_greedy=False)
        kept = beam_search(dec, feats, START, END, beam_size=2, max_len=10,
                           length_norm=False)
        lost += int((plain.scores < g.scores - 1e-5)[ended].sum())
        assert bool((kept.scores >= g.scores - 1e-5)[ended].all()), (V, seed)
        assert bool((kept.scores >= plain.scores - 1e-5).all()), (V, seed)
    assert lost == 4, "each stand-in should show plain beam search losing the greedy caption"


def test_no_end_fallback_returns_max_len_tokens(features):
    dec = TableDecoder(end_bias=-1e4)  # <end> practically impossible
    for k in (1, 3):
        out = beam_search(dec, features, START, END, beam_size=k, max_len=7)
        assert all(len(t) == 7 for t in out.tokens)
        assert not bool(out.finished.any())
        assert all(a.shape == (7, 6) for a in out.alphas)
        assert torch.isfinite(out.scores).all()
    g = greedy_decode(dec, features, START, END, max_len=7)
    assert all(len(t) == 7 for t in g.tokens) and not bool(g.finished.any())


def test_batched_beam_equals_per_image_beam(features):
    dec = TableDecoder(vocab_size=9, seed=5, end_bias=0.5)
    batched = beam_search(dec, features, START, END, beam_size=3, max_len=10,
                          return_beams=True)
    for b in range(features.size(0)):
        single = beam_search(dec, features[b:b + 1], START, END, beam_size=3, max_len=10)
        assert single.tokens[0] == batched.tokens[b]
        assert single.scores[0].item() == pytest.approx(batched.scores[b].item(), abs=1e-5)
        assert torch.allclose(single.alphas[0], batched.alphas[b])
    assert batched.norm_scores is not None
    for hyps in batched.beams:
        norms = [h.norm_score for h in hyps]
        assert norms == sorted(norms, reverse=True) and len(hyps) >= 1


def test_length_norm_ranks_by_mean_log_prob(features):
    dec = TableDecoder(vocab_size=6, seed=2)
    out = beam_search(dec, features, START, END, beam_size=4, max_len=8, length_norm=True,
                      return_beams=True)
    for b, hyps in enumerate(out.beams):
        best = hyps[0]
        if best.finished:
            length = len(best.tokens) + 1
            assert best.norm_score == pytest.approx(best.score / length)
        assert out.norm_scores[b].item() == pytest.approx(max(h.norm_score for h in hyps))


def test_vocabulary_and_wrapper_accepted_and_mode_restored(features):
    dec = TableDecoder(end_bias=1.0)
    dec.train()
    vocab = SimpleNamespace(start_id=START, end_id=END)
    wrapper = nn.Module()
    wrapper.decoder = dec
    a = greedy_decode(wrapper, features, vocab, max_len=6)
    b = greedy_decode(dec, features, START, END, max_len=6)
    assert a.tokens == b.tokens
    assert dec.training
    with pytest.raises(TypeError, match="keyword"):
        greedy_decode(dec, features, vocab, 6)  # 6 would silently be taken as end_id
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(dec, features, START, END, beam_size=0)


# -- the real decoder -------------------------------------------------------------------

def _real_decoder(vocab_size=12, seed=0):
    from caption_lib.decoder import DecoderWithAttention

    torch.manual_seed(seed)
    dec = DecoderWithAttention(vocab_size, encoder_dim=16, embed_dim=8, decoder_dim=12,
                               attention_dim=10, dropout=0.5)
    with torch.no_grad():
        dec.fc.weight.mul_(30.0)  # peaky distributions, like a trained model
        dec.fc.bias[END] = 1.0
    return dec


def test_real_decoder_beam_one_equals_greedy_and_batching():
    feats = torch.randn(5, 9, 16, generator=torch.Generator().manual_seed(4))  # (B, P, E)
    dec = _real_decoder()
    g = greedy_decode(dec, feats, START, END, max_len=10)
    b1 = beam_search(dec, feats, START, END, beam_size=1, max_len=10)
    assert b1.tokens == g.tokens
    assert torch.allclose(b1.scores, g.scores)
    assert all(a.shape == (len(t), 9) for a, t in zip(g.alphas, g.tokens))
    b3 = beam_search(dec, feats, START, END, beam_size=3, max_len=10, length_norm=False)
    for i in range(5):
        one = beam_search(dec, feats[i:i + 1], START, END, beam_size=3, max_len=10,
                          length_norm=False)
        assert one.tokens[0] == b3.tokens[i]
        if bool(g.finished[i]):
            assert b3.scores[i].item() >= g.scores[i].item() - 1e-4
        # the score is the model's own log-probability of the sequence
        expected = sequence_logp(dec, feats[i:i + 1], b3.tokens[i], end=bool(b3.finished[i]))
        assert b3.scores[i].item() == pytest.approx(expected, abs=1e-3)
    assert dec.training  # mode restored (dropout was off while decoding)


def test_caption_image_with_a_tiny_captioner(tmp_path):
    from PIL import Image

    from caption_lib.decoding import caption_image
    from caption_lib.errors import CaptionLibError
    from caption_lib.model import Captioner, CaptionerConfig
    from caption_lib.vocab import Vocabulary

    vocab = Vocabulary(["a", "red", "circle", "blue", "square"])
    config = CaptionerConfig(encoder_weights=None, embed_dim=8, decoder_dim=8,
                             attention_dim=8, dropout=0.0)
    model = Captioner(vocab, config)
    image = Image.new("RGBA", (40, 30), (200, 20, 20, 128))
    words, alphas = caption_image(model, image, beam_size=2, max_len=5)
    assert len(words) <= 5
    assert alphas.shape == (len(words), 49)
    assert all(w in vocab.itos for w in words)
    assert "<start>" not in words and "<end>" not in words
    path = tmp_path / "gray.png"
    image.convert("L").save(path)
    words2, alphas2 = caption_image(model, path, beam_size=1, max_len=5)
    assert alphas2.shape == (len(words2), 49)
    assert model.training  # mode restored
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(CaptionLibError, match="empty.png"):
        caption_image(model, tmp_path / "empty.png")


# -- keep_greedy: the greedy caption read off the beams ----------------------------------

def _search_with_spies(monkeypatch, dec, feats, k, max_len, **kwargs):
    """beam_search's result, the greedy captions it ranked, and how many greedy prefixes
    left the beams mid-search and how many were still beams when the search stopped."""
    from caption_lib import decoding

    seen = {}
    add, finish = decoding._add_greedy, decoding._GreedyInBeam.finish

    def spy_add(finished, greedy, normalise):
        seen["greedy"] = greedy
        add(finished, greedy, normalise)

    def spy_finish(self, *args):
        finish(self, *args)
        seen["left"] = (self.joined, self.outlived)

    monkeypatch.setattr(decoding, "_add_greedy", spy_add)
    monkeypatch.setattr(decoding._GreedyInBeam, "finish", spy_finish)
    out = beam_search(dec, feats, START, END, beam_size=k, max_len=max_len,
                      return_beams=True, **kwargs)
    monkeypatch.undo()
    return out, seen["greedy"], seen["left"]


def _same_greedy(got, want, exact):
    assert got.tokens == want.tokens
    assert torch.equal(got.finished, want.finished)
    close = torch.equal if exact else (lambda x, y: torch.allclose(x, y, atol=1e-5))
    assert close(got.scores, want.scores)
    assert all(close(x, y) for x, y in zip(got.alphas, want.alphas))


def test_keep_greedy_reads_greedy_decodings_caption_off_the_beams(features, monkeypatch):
    """The greedy caption beam_search ranks is greedy_decode's, whether its prefix stays
    a live beam to the end (no greedy step of its own), leaves the beams mid-search, or
    outlives the search; and the search's result is that of plain beam search plus
    greedy_decode's caption (how keep_greedy was computed before)."""
    from caption_lib.decoding import _add_greedy, _length_alpha

    cases = [(TableDecoder(vocab_size=V, seed=seed, end_bias=bias), features, True)
             for V, bias, seed in itertools.product((6, 9), (-1.0, 0.5, 2.0), range(2))]
    feats = torch.randn(5, 9, 16, generator=torch.Generator().manual_seed(4))  # (B, P, E)
    cases += [(_real_decoder(seed=seed), feats, False) for seed in range(4)]
    left_mid_search = outlived = never_left = 0
    for (dec, x, exact), k, norm in itertools.product(cases, (2, 3), (True, False)):
        out, greedy, (left, still_beams) = _search_with_spies(monkeypatch, dec, x, k, 8,
                                                              length_norm=norm)
        _same_greedy(greedy, greedy_decode(dec, x, START, END, max_len=8), exact)
        plain = beam_search(dec, x, START, END, beam_size=k, max_len=8, length_norm=norm,
                            return_beams=True, keep_greedy=False)
        alpha = _length_alpha(norm)
        _add_greedy(plain.beams, greedy, lambda s, n, a=alpha: s / n ** a if a else s)
        for hyps in plain.beams:
            hyps.sort(key=lambda hyp: hyp.norm_score, reverse=True)
        assert [[h.tokens for h in hyps] for hyps in out.beams] == \
            [[h.tokens for h in hyps] for hyps in plain.beams]
        never_left += left == still_beams == 0
        left_mid_search += left > 0
        outlived += still_beams > 0
    assert never_left >= 5 and left_mid_search >= 5 and outlived >= 5, \
        (never_left, left_mid_search, outlived)


def test_greedy_captions_that_leave_the_beams_ride_in_the_beam_steps(monkeypatch):
    """A greedy prefix that falls out of the beams takes its next steps in the same
    decoder.step calls as the beams (its rows after theirs), not in a second loop: a
    search that runs to max_len makes exactly max_len step calls, and the greedy caption
    it ranks is still greedy_decode's."""
    dec = TableDecoder(vocab_size=9, seed=0, end_bias=-30.0)  # no <end>: all 8 steps run
    x = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(7))  # (B, P, E)
    calls, rows = [], []
    step = TableDecoder.step

    def spy(self, tokens, state, features, projected):
        calls.append(1)
        rows.append(tokens.size(0))
        return step(self, tokens, state, features, projected)

    monkeypatch.setattr(TableDecoder, "step", spy)
    _, greedy, (left, _) = _search_with_spies(monkeypatch, dec, x, 2, 8)  # undoes the spy
    assert left > 0, "no greedy prefix left the beams: the case is not tested"
    assert len(calls) == 8 and max(rows) > 6 * 2, rows  # riders in the beams' steps
    _same_greedy(greedy, greedy_decode(dec, x, START, END, max_len=8), True)


# -- precision="bf16" --------------------------------------------------------------------

def test_bf16_search_runs_a_bf16_copy_and_scores_the_same_model(monkeypatch):
    from caption_lib.decoder import DecoderWithAttention

    feats = torch.randn(6, 9, 16, generator=torch.Generator().manual_seed(5))  # (B, P, E)
    dec = _real_decoder()
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    seen = []
    step = DecoderWithAttention.step

    def spy(self, tokens, state, features, *args, **kwargs):
        regions = features.x if isinstance(features, StepInput) else features  # (B, P, E)
        seen.append((state[0].dtype, regions.dtype, self is dec))
        return step(self, tokens, state, features, *args, **kwargs)

    monkeypatch.setattr(DecoderWithAttention, "step", spy)
    fp32 = beam_search(dec, feats, START, END, beam_size=3, max_len=10, length_norm=False)
    assert {s for s in seen} == {(torch.float32, torch.float32, True)}
    seen.clear()
    low = beam_search(dec, feats, START, END, beam_size=3, max_len=10, length_norm=False,
                      precision="bf16")
    # every step ran in bf16 on a copy; the caller's decoder is untouched and still fp32
    assert seen and {s for s in seen} == {(torch.bfloat16, torch.bfloat16, False)}
    assert all(torch.equal(v, before[k]) for k, v in dec.state_dict().items())
    assert dec.training  # mode restored too
    assert low.scores.dtype == torch.float32
    assert all(a.dtype == torch.float32 and a.shape == (len(t), 9)
               for a, t in zip(low.alphas, low.tokens))
    for i in range(6):  # the same model, rounded: its score is the fp32 model's own, nearly
        expected = sequence_logp(dec, feats[i:i + 1], low.tokens[i], end=bool(low.finished[i]))
        assert low.scores[i].item() == pytest.approx(expected, abs=0.1 * (len(low.tokens[i]) + 1))
    # peaky distributions (like a trained model's): bf16 picks the same words as fp32
    assert low.tokens == fp32.tokens
    greedy = greedy_decode(dec, feats, START, END, max_len=10, precision="bf16")
    assert greedy.tokens == greedy_decode(dec, feats, START, END, max_len=10).tokens


def test_unknown_precision_is_one_clear_error():
    dec, feats = _real_decoder(), torch.randn(2, 9, 16)
    for search in (greedy_decode, beam_search):
        with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\), got 'fp16'"):
            search(dec, feats, START, END, precision="fp16")
