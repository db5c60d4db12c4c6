"""Additive attention: shapes, alpha is a distribution, masking, gradients, projection once."""

from __future__ import annotations

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
