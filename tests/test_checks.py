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
