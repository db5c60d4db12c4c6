"""Additive attention: shapes, alpha is a distribution, masking, gradients, projection once."""

from __future__ import annotations

import copy

import torch

from caption_lib import Attention

B, P, E, H, A = 3, 5, 6, 4, 7


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(B, P, E, generator=gen, dtype=dtype)  # (B, P, E)
    hidden = torch.randn(B, H, generator=gen, dtype=dtype)  # (B, H)
    return features, hidden


def test_shapes_and_alpha_is_a_distribution():
    att = Attention(E, H, A)
    features, hidden = _inputs()
    context, alpha = att(features, hidden)
    assert context.shape == (B, E) and alpha.shape == (B, P)
    assert att.project(features).shape == (B, P, A)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(B))
    assert (alpha > 0).all()
    # context is the alpha-weighted sum of the regions
    torch.testing.assert_close(context, (alpha.unsqueeze(2) * features).sum(dim=1))


def test_mask_gives_padded_regions_exactly_zero():
    att = Attention(E, H, A)
    features, hidden = _inputs()
    mask = torch.ones(B, P, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, :4] = False  # only the last region is real
    context, alpha = att(features, hidden, mask=mask)
    assert (alpha[~mask] == 0).all()
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(B))
    assert alpha[2, 4].item() == 1.0
    torch.testing.assert_close(context[2], features[2, 4])
    # padding values do not leak: changing a masked region changes nothing
    changed = features.clone()
    changed[0, 4] += 100.0
    context2, alpha2 = att(changed, hidden, mask=mask)
    torch.testing.assert_close(context2, context)
    torch.testing.assert_close(alpha2, alpha)


def test_projection_once_equals_the_per_step_formulation():
    torch.manual_seed(1)
    att = Attention(E, H, A).double()
    features, _ = _inputs(torch.float64)
    projected = att.project(features)  # once per sequence
    for t in range(4):
        hidden = torch.randn(B, H, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        fast = att(features, hidden, projected=projected)
        # the per-step formulation written out: e = w^T tanh(W_a a + W_h h)
        e = att.full_att(torch.tanh(att.encoder_att(features)
                                    + att.decoder_att(hidden).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(e, dim=1)
        context = (alpha.unsqueeze(2) * features).sum(dim=1)
        torch.testing.assert_close(fast[1], alpha, atol=1e-6, rtol=0)
        torch.testing.assert_close(fast[0], context, atol=1e-6, rtol=0)


def test_gradcheck_on_small_doubles():
    torch.manual_seed(2)
    att = Attention(4, 3, 5).double()
    features = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.autograd.gradcheck(lambda f, h: att(f, h), (features, hidden))
    assert torch.autograd.gradcheck(lambda f, h: att(f, h, mask=mask), (features, hidden))


def test_attention_learns_to_pick_the_target_region():
    torch.manual_seed(3)
    att = Attention(8, 4, 8)
    opt = torch.optim.Adam(att.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(3)
    for _ in range(150):
        features = torch.randn(16, 5, 8, generator=gen)  # (16, 5, 8)
        hidden = torch.zeros(16, 4)  # (16, 4)
        # the target region is marked by a large first feature
        target = torch.randint(0, 5, (16,), generator=gen)
        features[torch.arange(16), target, 0] = 3.0
        _, alpha = att(features, hidden)
        loss = -torch.log(alpha[torch.arange(16), target] + 1e-9).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert alpha[torch.arange(16), target].mean().item() > 0.9


def _scores_in_one_piece(att, query, projected):
    return att.full_att((projected + query.unsqueeze(1)).tanh()).squeeze(2)  # (R, P)


def test_scores_without_autograd_come_in_chunks_and_equal_the_one_piece_formula():
    """Decoding (no autograd, CPU) takes `_scores_in_chunks`: CHUNK rows at a time through
    one buffer. Row counts below, at and around CHUNK multiples give the scores of the
    one-piece formula; alpha from `weights` is their softmax, masks included."""
    from caption_lib.attention import CHUNK

    att = Attention(E, H, A)
    gen = torch.Generator().manual_seed(1)
    for rows in (1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3):
        projected = torch.randn(rows, P, A, generator=gen)  # (R, P, A)
        query = torch.randn(rows, A, generator=gen)  # (R, A)
        with torch.no_grad():
            expected = _scores_in_one_piece(att, query, projected)
            torch.testing.assert_close(att._scores_in_chunks(query, projected), expected)
            mask = torch.rand(rows, P, generator=gen) > 0.3
            mask[:, 0] = True
            alpha = att.weights(query, projected, mask)
        torch.testing.assert_close(
            alpha, torch.softmax(expected.masked_fill(~mask, float("-inf")), dim=1))
    # bf16 inputs (the bf16 search): scores in fp32 (the sum too),
    # alpha back in bf16 for the context product with bf16 features
    low = Attention(E, H, A).to(torch.bfloat16)
    projected, query = projected.to(torch.bfloat16), query.to(torch.bfloat16)
    with torch.no_grad():
        scores = low._scores_in_chunks(query, projected)
        assert scores.dtype == torch.float32
        torch.testing.assert_close(
            scores, _scores_in_one_piece(copy.deepcopy(low).float(), query.float(), projected.float()),
            atol=0.05, rtol=0.02)
        assert low.weights(query, projected).dtype == torch.bfloat16
    assert att._scores_in_chunks(query[:0].float(), projected[:0].float()).shape == (0, P)


def test_scores_with_autograd_keep_their_gradients():
    """With autograd (training) the one-piece path runs and every input gets a gradient;
    the same call without autograd gives the same alpha."""
    att = Attention(E, H, A)
    gen = torch.Generator().manual_seed(2)
    projected = torch.randn(11, P, A, generator=gen, requires_grad=True)  # (R, P, A)
    query = torch.randn(11, A, generator=gen, requires_grad=True)  # (R, A)
    alpha = att.weights(query, projected)
    (alpha[:, 0].sum()).backward()
    assert projected.grad.abs().sum() > 0 and query.grad.abs().sum() > 0
    assert att.full_att.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(att.weights(query, projected), alpha.detach())


def test_decoding_scores_from_sigmoids_equal_the_papers_tanh_form_when_saturated():
    """Decoding's chunks compute w^T tanh(x) + b as (2w)^T sigma(2x) + b - sum(w)
    (`sigmoid_form`; tanh(x) = 2 sigma(2x) - 1): the same scores, also where the tanh
    saturates (|x| up to ~30)."""
    from caption_lib.attention import sigmoid_form

    att = Attention(E, H, A)
    gen = torch.Generator().manual_seed(3)
    projected = torch.randn(5, P, A, generator=gen) * 8  # (R, P, A)
    query = torch.randn(5, A, generator=gen) * 8  # (R, A)
    with torch.no_grad():
        torch.testing.assert_close(att._scores_in_chunks(query, projected),
                                   _scores_in_one_piece(att, query, projected),
                                   atol=1e-5, rtol=1e-5)
    w, b = torch.randn(1, A, generator=gen), torch.randn(1, generator=gen)
    x = torch.linspace(-30, 30, A)  # (A,)
    w2, b2 = sigmoid_form(w, b)
    torch.testing.assert_close(w2 @ torch.sigmoid(2 * x) + b2, w @ torch.tanh(x) + b,
                               atol=1e-4, rtol=1e-5)
