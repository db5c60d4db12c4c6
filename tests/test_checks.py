"""caption_lib.checks: right implementations pass; planted wrong ones fail with a helpful message."""

from __future__ import annotations

import re

import pytest
import torch

from caption_lib import Vocabulary, checks, object_cell_mask, tokenize


def test_check_shape_names_expected_and_got_and_hints_at_permute():
    checks.check_shape(torch.zeros(2, 49, 2048), (2, 49, 2048))
    checks.check_shape(torch.zeros(5, 49, 2048), (None, 49, 2048))
    with pytest.raises(AssertionError, match=re.escape(
            "features: expected shape (B, 49, 2048) = (2, 49, 2048), got (2, 2048, 49) "
            "(the right sizes in the wrong order")):
        checks.check_shape(torch.zeros(2, 2048, 49), (2, 49, 2048), "features", "(B, 49, 2048)")
    with pytest.raises(AssertionError, match=r"got \(2, 100352\) \(2 dimensions instead of 3\)"):
        checks.check_shape(torch.zeros(2, 100352), (2, 49, 2048))
    with pytest.raises(AssertionError, match="must be a torch.Tensor, got list"):
        checks.check_shape([1, 2], (2,))


def test_check_close_reports_max_difference_and_position():
    ref = torch.zeros(2, 3)
    checks.check_close(ref + 1e-7, ref)
    bad = ref.clone()
    bad[1, 2] = 0.31
    with pytest.raises(AssertionError, match=re.escape(
            "output differs from the reference: max abs difference 0.31 at (1, 2): "
            "got 0.31, expected 0 (1 of 6 values wrong)")):
        checks.check_close(bad, ref)
    nan = ref.clone()
    nan[0, 1] = float("nan")
    with pytest.raises(AssertionError, match=r"non-finite value at \(0, 1\)"):
        checks.check_close(nan, ref)
    with pytest.raises(AssertionError, match=r"2 of 4 positions, e.g. at \(1, 0\): got False, expected True"):
        checks.check_close(torch.tensor([[1, 0], [0, 0]]).bool(), torch.ones(2, 2).bool().tril())


def test_check_normalised_explains_the_sums():
    checks.check_normalised(torch.softmax(torch.randn(3, 49), dim=1))
    wrong = torch.softmax(torch.randn(3, 49), dim=0)  # softmax over the batch
    sums = wrong.sum(dim=1)
    worst = (sums - 1).abs().argmax()
    with pytest.raises(AssertionError, match=(
            rf"alpha must sum to 1 over the 49 regions, got sums like {sums[worst]:.4g}")):
        checks.check_normalised(wrong)
    with pytest.raises(AssertionError, match="must not be negative"):
        checks.check_normalised(torch.tensor([[1.5, -0.5]]))


def test_check_function_passes_right_and_shows_inputs_when_wrong():
    def make(g):
        return (torch.randn(2, 4, generator=g),)

    checks.check_function(lambda x: x * 2, lambda x: x + x, make, trials=3)
    with pytest.raises(AssertionError, match=r"double\(\.\.\.\) differs .*\n  \(trial 1 of 3, "
                       r"inputs: arg0=tensor \(2, 4\) float32\)"):
        checks.check_function(lambda x: x * 3, lambda x: x * 2, make, trials=3, name="double")
    with pytest.raises(AssertionError, match="differs at index 1: got 'b', expected 'c'"):
        checks.check_function(lambda n: ["a", "b"], lambda n: ["a", "c"], lambda g: (1,))


def test_check_function_compares_gradients():
    def make(g):
        return (torch.randn(3, 5, generator=g),)

    def reference(x):
        return torch.softmax(x, dim=1)

    def detached(x):
        return torch.softmax(x.detach(), dim=1)

    def fake_grad(x):  # right values, wrong gradient
        return reference(x).detach() + 0 * x

    checks.check_function(reference, reference, make, gradients=True)
    with pytest.raises(AssertionError, match="no gradient flows through your output"):
        checks.check_function(detached, reference, make, gradients=True)
    with pytest.raises(AssertionError, match="the gradient with respect to `arg0` differs"):
        checks.check_function(fake_grad, reference, make, gradients=True)


def test_check_regions_from_map():
    def right(fmap):
        B, C, H, W = fmap.shape
        return fmap.permute(0, 2, 3, 1).reshape(B, H * W, C)

    def view_without_permute(fmap):  # the classic mistake: sizes right, data scrambled
        return fmap.reshape(fmap.size(0), -1, fmap.size(1))

    def no_permute(fmap):
        return fmap.flatten(2)

    def columns_first(fmap):
        return fmap.permute(0, 3, 2, 1).reshape(fmap.size(0), -1, fmap.size(1))

    checks.check_regions_from_map(right)
    with pytest.raises(AssertionError, match=re.escape(
            "expected shape (B, 49, 2048) = (2, 49, 2048), got (2, 2048, 49)")):
        checks.check_regions_from_map(no_permute)
    with pytest.raises(AssertionError, match="max abs difference"):
        checks.check_regions_from_map(view_without_permute)
    with pytest.raises(AssertionError, match="differs from the reference"):
        checks.check_regions_from_map(columns_first)


def _attention_forward(att, features, hidden, projected=None, mask=None, softmax_dim=1):
    if projected is None:
        projected = att.encoder_att(features)  # (B, P, A)
    scores = att.full_att(torch.tanh(projected + att.decoder_att(hidden).unsqueeze(1)))
    scores = scores.squeeze(2)  # (B, P)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    alpha = torch.softmax(scores, dim=softmax_dim)  # (B, P)
    return (alpha.unsqueeze(2) * features).sum(dim=1), alpha


def test_check_attention_forward():
    checks.check_attention_forward(_attention_forward)
    with pytest.raises(AssertionError, match="alpha must sum to 1 over the 49 regions, got sums"):
        checks.check_attention_forward(lambda *a, **k: _attention_forward(*a, **k, softmax_dim=0))

    def ignores_mask(att, features, hidden, projected=None, mask=None):
        return _attention_forward(att, features, hidden, projected)

    with pytest.raises(AssertionError, match="attention_forward with features, hidden, mask"):
        checks.check_attention_forward(ignores_mask)

    def detached_features(att, features, hidden, projected=None, mask=None):
        _, alpha = _attention_forward(att, features, hidden, projected, mask)
        return (alpha.unsqueeze(2) * features.detach()).sum(dim=1), alpha

    with pytest.raises(AssertionError, match="the gradient with respect to `features` differs"):
        checks.check_attention_forward(detached_features)

    def no_grad(att, features, hidden, projected=None, mask=None):
        with torch.no_grad():
            return _attention_forward(att, features, hidden, projected, mask)

    with pytest.raises(AssertionError, match="no gradient flows through your output"):
        checks.check_attention_forward(no_grad)


def test_check_attention_forward_leaves_the_global_random_state_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    checks.check_attention_forward(_attention_forward)
    assert torch.equal(torch.rand(3), expected)


def test_check_decode_step():
    def right(dec, tokens, state, features, projected):
        logits, state, alpha = dec.step(tokens, state, features, projected)
        return logits, state, alpha

    def no_gate(dec, tokens, state, features, projected):
        h, c = state
        context, alpha = dec.attention(features, h, projected=projected)
        h, c = dec.lstm(torch.cat([dec.embedding(tokens), context], dim=1), (h, c))
        return dec.fc(h), (h, c), alpha

    checks.check_decode_step(right)
    with pytest.raises(AssertionError, match=r"decode_step at step 0\[0\] differs"):
        checks.check_decode_step(no_gate)


@pytest.fixture()
def vocab():
    return Vocabulary.build(["a big red circle", "a small blue square left of a green triangle"])


def _encode(text, stoi):
    return [stoi["<start>"]] + [stoi.get(w, stoi["<unk>"]) for w in tokenize(text)] + [stoi["<end>"]]


def test_check_encode(vocab):
    checks.check_encode(_encode, vocab, texts=["a mauve circle"])
    with pytest.raises(AssertionError, match=r"encode\('a mauve circle'\): .* words not in the "
                       r"vocabulary map to <unk> \(3\)"):
        checks.check_encode(lambda t, s: [s["<start>"]] + [s[w] for w in t.split() if w in s]
                            + [s["<end>"]], vocab, texts=["a mauve circle"])
    with pytest.raises(AssertionError, match=r"must end with <end> \(2\)"):
        checks.check_encode(lambda t, s: _encode(t, s)[:-1], vocab)
    with pytest.raises(AssertionError, match="did you tokenize"):
        checks.check_encode(lambda t, s: [s["<start>"]] + [s.get(w, 3) for w in t.split()]
                            + [s["<end>"]], vocab, texts=["A big red circle."])


def test_check_cell_mask():
    checks.check_cell_mask(object_cell_mask, boxes=[[100, 100, 130, 130]])

    def off_by_one(box):  # treats x1, y1 as inclusive
        x0, y0, x1, y1 = box
        return object_cell_mask([x0, y0, x1 + 1, y1 + 1])

    with pytest.raises(AssertionError, match=re.escape(
            "cell_mask([64, 64, 96, 96]) covers cells [[2, 2], [2, 3], [3, 2], [3, 3]], "
            "expected [[2, 2]] (row, column)")):
        checks.check_cell_mask(off_by_one, boxes=[[64, 64, 96, 96]])


# -- the checks of the chapters' tasks: a right answer passes, each planted mistake fails
#    with its own sentence ---------------------------------------------------------------

def test_check_equal_and_the_summary(capsys):
    checks.check_equal([1, 2], [1, 2], "ids")
    with pytest.raises(AssertionError, match=r"^ids differs at index 1: got 3, expected 2: "
                                             r"ids start at 1$"):
        checks.check_equal([1, 3], [1, 2], "ids", "ids start at 1")
    with pytest.raises(AssertionError, match=r"is_attention\(x\): got True, expected False"):
        checks.check_equal(True, False, "is_attention(x)")
    checks._PASSED.clear()
    checks.passed("Exercise 1")
    done = checks.summary({"Exercise 1": 2, "Exercise 2": 4})
    out = capsys.readouterr().out
    assert done == {"Exercise 1": True, "Exercise 2": False}
    assert "Exercise 1: correct\nExercise 1 (2 points): correct\nExercise 2 (4 points): not yet" in out
    assert "visible tests passed: 2 of 6 points" in out
    checks._PASSED.clear()


def _recalibrate(net, batches):
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    was, saved = net.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    seen = 0
    with torch.no_grad():
        for x in batches:
            net(x)
            seen += len(x)
    for m, s in zip(norms, saved):
        m.momentum = s
    net.train(was)
    return seen


def test_check_recalibrate():
    checks.check_recalibrate(_recalibrate)

    def keeps_momentum(net, batches):  # exponential average: the last batches weigh more
        norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms:
            m.reset_running_stats()
        was = net.training
        net.train()
        n = 0
        with torch.no_grad():
            for x in batches:
                net(x)
                n += len(x)
        net.train(was)
        return n

    with pytest.raises(AssertionError, match=r"running_mean differs .*every batch must count "
                                             r"equally \(momentum=None"):
        checks.check_recalibrate(keeps_momentum)

    def eval_mode(net, batches):  # runs the batches without train mode: nothing is updated
        with torch.no_grad():
            net.eval()
            return sum(len(net(x)) for x in batches)

    with pytest.raises(AssertionError, match="the running mean did not change"):
        checks.check_recalibrate(eval_mode)

    def forgets_mode(net, batches):
        seen = _recalibrate(net, batches)
        net.train()
        return seen

    with pytest.raises(AssertionError, match="back in eval mode afterwards"):
        checks.check_recalibrate(forgets_mode)


def _lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh):
    i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_check_lstm_step():
    checks.check_lstm_step(_lstm_step)

    def gates_ifog(x, h, c, w_ih, w_hh, b_ih, b_hh):
        i, f, o, g = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    with pytest.raises(AssertionError, match="the gates are in the order input, forget, output, cell"):
        checks.check_lstm_step(gates_ifog)
    with pytest.raises(AssertionError, match=r"you return \(c, h\)"):
        checks.check_lstm_step(lambda *a: _lstm_step(*a)[::-1])

    def no_tanh(x, h, c, w_ih, w_hh, b_ih, b_hh):
        i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * c, c

    with pytest.raises(AssertionError, match=r"lstm_step\(\.\.\.\)\[0\] differs from the reference"):
        checks.check_lstm_step(no_tanh)

    def stale_c(x, h, c, w_ih, w_hh, b_ih, b_hh):  # right values, gradient cut through c
        h2, c2 = _lstm_step(x, h, c.detach(), w_ih, w_hh, b_ih, b_hh)
        return h2, c2

    with pytest.raises(AssertionError, match="no gradient reaches `c`: did you use .detach()"):
        checks.check_lstm_step(stale_c)

    def in_place(x, h, c, w_ih, w_hh, b_ih, b_hh):  # values right, gradient of w_ih wrong
        h2, c2 = _lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
        return h2 + 0 * (x @ w_ih.T).sum() - (0 * (x @ w_ih.T).sum()).detach() * 0, c2

    checks.check_lstm_step(in_place)  # an equivalent formulation passes


class _Dot(torch.nn.Module):
    def __init__(self, encoder_dim, decoder_dim, attention_dim, scaled=True):
        super().__init__()
        self.key = torch.nn.Linear(encoder_dim, attention_dim)
        self.query = torch.nn.Linear(decoder_dim, attention_dim)
        self.scaled = scaled

    def forward(self, features, hidden, mask=None):
        scores = (self.key(features) @ self.query(hidden).unsqueeze(2)).squeeze(2)
        if self.scaled:
            scores = scores / self.key.out_features ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(scores, dim=1)
        return (alpha.unsqueeze(2) * features).sum(dim=1), alpha


def test_check_dot_attention():
    checks.check_dot_attention(_Dot)
    with pytest.raises(AssertionError, match=r"unscaled dot products: divide the scores by sqrt\(A\)"):
        checks.check_dot_attention(lambda e, h, a: _Dot(e, h, a, scaled=False))

    class IgnoresMask(_Dot):
        def forward(self, features, hidden, mask=None):
            return super().forward(features, hidden)

    with pytest.raises(AssertionError, match=r"forward\(features, hidden, mask\)"):
        checks.check_dot_attention(IgnoresMask)


def test_penalty_reference_is_caption_loss_regulariser():
    from caption_lib.decoder import caption_loss

    alphas, mask, lengths = checks._steps_inputs(torch.Generator().manual_seed(3))
    captions = torch.ones(len(lengths), mask.size(1) + 1, dtype=torch.long)
    _, parts = caption_loss(torch.zeros(*mask.shape, 3), captions, lengths, alphas, alpha_c=1.0)
    assert abs(float(checks._penalty_reference(alphas, mask, 2.5)) - 2.5 * parts["reg"]) < 1e-5


def test_check_attention_penalty():
    checks.check_attention_penalty(checks._penalty_reference)
    with pytest.raises(AssertionError, match="the padded steps count"):
        checks.check_attention_penalty(
            lambda a, m, lam: lam * ((1 - a.sum(dim=1)) ** 2).sum(dim=1).mean())
    with pytest.raises(AssertionError, match="mean over the batch, not the sum"):
        checks.check_attention_penalty(
            lambda a, m, lam: lam * ((1 - (a * m.unsqueeze(2)).sum(dim=1)) ** 2).sum())
    with pytest.raises(AssertionError, match=r"attention_penalty\(\.\.\.\) differs"):
        checks.check_attention_penalty(lambda a, m, lam: checks._penalty_reference(a, m, 1.0))


def test_check_masked_xent():
    import torch.nn.functional as F

    def right(logits, captions, lengths):
        real = torch.arange(logits.size(1)) < (lengths - 1).unsqueeze(1)
        return F.cross_entropy(logits[real], captions[:, 1:][real])

    checks.check_masked_xent(right)
    with pytest.raises(AssertionError, match="averages over all B\\*T positions"):
        checks.check_masked_xent(lambda lg, cap, lens: F.cross_entropy(lg.flatten(0, 1),
                                                                      cap[:, 1:].flatten()))
    with pytest.raises(AssertionError, match=r"masked_xent\(\.\.\.\) differs"):
        checks.check_masked_xent(lambda lg, cap, lens: right(lg, cap, lens) * 2)


def test_check_clip_grad_norm():
    def right(grads, max_norm):
        norm = torch.cat([g.flatten() for g in grads]).norm()
        scale = min(1.0, max_norm / (float(norm) + 1e-6))
        return [g * scale for g in grads], norm

    checks.check_clip_grad_norm(right)
    with pytest.raises(AssertionError, match="each tensor is clipped on its own"):
        checks.check_clip_grad_norm(lambda gs, m: ([g * min(1.0, m / float(g.norm())) for g in gs],
                                                   gs[0].norm()))
    with pytest.raises(AssertionError, match=r"below max_norm stay as they are"):
        checks.check_clip_grad_norm(
            lambda gs, m: ([g * m / float(torch.cat([t.flatten() for t in gs]).norm()) for g in gs]
                           if float(torch.cat([t.flatten() for t in gs]).norm()) < m
                           else right(gs, m)[0], right(gs, m)[1]))


def _bleu4(references, hypothesis):
    import math
    from collections import Counter

    def grams(words, m):
        return Counter(tuple(words[i:i + m]) for i in range(len(words) - m + 1))

    log_p = 0.0
    for m in range(1, 5):
        counts, clip = grams(hypothesis, m), Counter()
        for ref in references:
            clip |= grams(ref, m)
        matched = sum(min(c, clip[g]) for g, c in counts.items())
        if matched == 0:
            return 0.0
        log_p += math.log(matched / sum(counts.values())) / 4
    c = len(hypothesis)
    r = min((abs(len(ref) - c), len(ref)) for ref in references)[1]
    return 100 * (1.0 if c > r else math.exp(1 - r / c)) * math.exp(log_p)


def test_check_bleu4():
    checks.check_bleu4(_bleu4)

    def no_brevity(refs, hyp):
        c = len(hyp)
        r = min((abs(len(ref) - c), len(ref)) for ref in refs)[1]
        bp = 1.0 if c > r else math.exp(1 - r / c)
        return _bleu4(refs, hyp) / bp

    import math

    with pytest.raises(AssertionError, match="pays the brevity penalty"):
        checks.check_bleu4(no_brevity)
