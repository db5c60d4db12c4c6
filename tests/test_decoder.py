"""The attention LSTM decoder: shapes, masking, loss, step == forward, overfitting, baseline."""

from __future__ import annotations

import pytest
import torch

from caption_lib import DecoderWithAttention, caption_loss
from caption_lib.decoder import step_mask

V, E, D, H, A, P = 11, 6, 5, 8, 7, 4


def _batch(B=3, L=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(B, P, E, generator=gen)  # (B, P, E)
    lengths = torch.tensor([L, L - 2, 3][:B])  # (B,)
    captions = torch.randint(4, V, (B, L), generator=gen)  # (B, L)
    captions[:, 0] = 1  # <start>
    captions[torch.arange(B), lengths - 1] = 2  # <end>
    captions[torch.arange(L).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # <pad>
    return features, captions, lengths


def _decoder(**kw):
    torch.manual_seed(0)
    return DecoderWithAttention(V, encoder_dim=E, embed_dim=D, decoder_dim=H,
                                attention_dim=A, **kw)


def test_forward_shapes_and_alphas_zero_at_padded_steps():
    dec = _decoder()
    features, captions, lengths = _batch()
    logits, alphas = dec(features, captions, lengths)
    assert logits.shape == (3, 5, V) and alphas.shape == (3, 5, P)
    real = step_mask(lengths, 5)
    assert real.tolist()[2] == [True, True, False, False, False]
    torch.testing.assert_close(alphas.sum(dim=2), real.float())
    h, c = dec.init_state(features)
    assert h.shape == c.shape == (3, H)


@pytest.mark.parametrize("deep_output", [False, True])
def test_step_loop_reproduces_forward_in_eval_mode(deep_output):
    dec = _decoder(deep_output=deep_output).eval()
    features, captions, lengths = _batch()
    with torch.no_grad():
        logits, alphas = dec(features, captions, lengths)
        state = dec.init_state(features)
        projected = dec.project(features)
        for t in range(captions.size(1) - 1):
            step_logits, state, alpha = dec.step(captions[:, t], state, features, projected)
            real = t < lengths - 1
            torch.testing.assert_close(step_logits[real], logits[real, t], atol=1e-6, rtol=0)
            torch.testing.assert_close(alpha[real], alphas[real, t], atol=1e-6, rtol=0)
        # without `projected` the step recomputes it: same numbers
        again, _, _ = dec.step(captions[:, 0], dec.init_state(features), features)
        torch.testing.assert_close(again, logits[:, 0], atol=1e-6, rtol=0)


def test_padded_positions_do_not_change_real_outputs():
    dec = _decoder().eval()
    features, captions, lengths = _batch()
    other = captions.clone()
    other[2, 3:] = 7  # garbage after the end of the short caption
    with torch.no_grad():
        a, _ = dec(features, captions, lengths)
        b, _ = dec(features, other, lengths)
    torch.testing.assert_close(a[2, :2], b[2, :2])
    loss_a, _ = caption_loss(a, captions, lengths, torch.zeros(3, 5, P))
    loss_b, _ = caption_loss(b, other, lengths, torch.zeros(3, 5, P))
    torch.testing.assert_close(loss_a, loss_b)


def test_caption_loss_values():
    _features, captions, lengths = _batch()
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, V, generator=gen)
    alphas = torch.softmax(torch.randn(3, 5, P, generator=gen), dim=2)
    loss, parts = caption_loss(logits, captions, lengths, alphas, alpha_c=0.5)
    real = step_mask(lengths, 5)
    # cross-entropy written out over the real tokens only
    logp = torch.log_softmax(logits, dim=2).gather(2, captions[:, 1:].unsqueeze(2)).squeeze(2)
    xent = -(logp * real).sum() / real.sum()
    total = (alphas * real.unsqueeze(2)).sum(dim=1)  # (B, P)
    reg = ((1 - total) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(loss, xent + 0.5 * reg)
    assert abs(parts["xent"] - xent.item()) < 1e-5 and abs(parts["reg"] - reg.item()) < 1e-5
    assert parts["tokens"] == float(lengths.sum() - 3) == 10.0
    # lengths=None counts the non-pad tokens: same loss
    loss2, _ = caption_loss(logits, captions, None, alphas, alpha_c=0.5, pad_id=0)
    torch.testing.assert_close(loss2, loss)


def test_tiny_model_overfits_one_batch():
    dec = _decoder(dropout=0.0)
    features, captions, lengths = _batch()
    opt = torch.optim.Adam(dec.parameters(), lr=0.02)
    losses = []
    for _ in range(100):
        logits, alphas = dec(features, captions, lengths)
        loss, parts = caption_loss(logits, captions, lengths, alphas, alpha_c=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["xent"])
    assert losses[0] > 2.0 and losses[-1] < 0.1, (losses[0], losses[-1])


def test_baseline_without_attention():
    dec = _decoder(use_attention=False).eval()
    assert dec.attention is None and dec.project(torch.zeros(1, P, E)) is None
    features, captions, lengths = _batch()
    with torch.no_grad():
        logits, alphas = dec(features, captions, lengths)
        step_logits, _, alpha = dec.step(captions[:, 0], dec.init_state(features), features)
    assert logits.shape == (3, 5, V)
    torch.testing.assert_close(alphas[0], torch.full((5, P), 1.0 / P))
    torch.testing.assert_close(alpha, torch.full((3, P), 1.0 / P))
    torch.testing.assert_close(step_logits, logits[:, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("deep_output", [False, True])
def test_decoder_gradcheck_on_small_doubles(deep_output):
    dec = _decoder(dropout=0.0, deep_output=deep_output).double()
    features, captions, lengths = _batch(B=2, L=4)
    features = features.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: dec(f, captions, lengths)[0], (features,))


@pytest.mark.parametrize("deep_output", [False, True])
def test_batch_order_does_not_matter(deep_output):
    dec = _decoder(deep_output=deep_output).eval()
    features, captions, lengths = _batch()
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        logits, alphas = dec(features, captions, lengths)
        logits_p, alphas_p = dec(features[perm], captions[perm], lengths[perm])
    torch.testing.assert_close(logits_p, logits[perm], atol=1e-6, rtol=0)
    torch.testing.assert_close(alphas_p, alphas[perm], atol=1e-6, rtol=0)


def test_deep_output_reads_the_word_and_the_context_directly():
    """The paper's deep output (Eq. 7): its layers and sizes, and the word at step t
    depends on the context z_t through L_z, not only through h_t (zeroing L_z changes it)."""
    dec = _decoder(deep_output=True).eval()
    assert dec.out_h.weight.shape == (D, H) and dec.out_z.weight.shape == (D, E)
    assert dec.fc.weight.shape == (V, D)
    assert not hasattr(_decoder(), "out_z") and _decoder().fc.weight.shape == (V, H)
    features, captions, lengths = _batch()
    with torch.no_grad():
        logits, _ = dec(features, captions, lengths)
        dec.out_z.weight.zero_()
        without, _ = dec(features, captions, lengths)
    assert not torch.allclose(logits, without)
