"""caption_lib.recurrent: one weight-gradient product for a loop, inputs read as prefixes
of a shrinking batch, and the LSTM update; the decoder built on them against the plain per-step formulation (nn.LSTMCell)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from caption_lib.decoder import DecoderWithAttention, caption_loss
from caption_lib.recurrent import RepeatedRows, StepInput, StepWeight, lstm_cell


def _loop(weight: torch.Tensor, xs: list[torch.Tensor], shared: bool) -> torch.Tensor:
    """A toy recurrence y_t = tanh(x_t W^T + y_{t-1}[:b]) over a shrinking batch."""
    step = StepWeight(weight) if shared else (lambda x: x @ weight.t())
    y = torch.zeros(xs[0].size(0), weight.size(0), dtype=weight.dtype)
    total = 0.0
    for x in xs:
        y = torch.tanh(step(x) + y[:x.size(0)])  # (b, N)
        total = total + (y ** 2).sum()
    return total


def _inputs(dtype=torch.float64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=gen, dtype=dtype, requires_grad=True)
    xs = [torch.randn(b, 4, generator=gen, dtype=dtype, requires_grad=True) for b in (5, 5, 3, 1)]
    return weight, xs


def test_step_weight_gradients_equal_autograds():
    weight, xs = _inputs()
    grads = []
    for shared in (False, True):
        weight.grad = None
        for x in xs:
            x.grad = None
        _loop(weight, xs, shared).backward()
        grads.append([weight.grad.clone()] + [x.grad.clone() for x in xs])
    for plain, one_product in zip(*grads):
        torch.testing.assert_close(one_product, plain)


def test_step_weight_passes_gradcheck_and_second_backward():
    weight, xs = _inputs()
    assert torch.autograd.gradcheck(lambda w, *x: _loop(w, list(x), True), (weight, *xs))
    loss = _loop(weight, xs, True)
    first = torch.autograd.grad(loss, weight, retain_graph=True)[0]
    second = torch.autograd.grad(loss, weight)[0]  # the records are not used up
    torch.testing.assert_close(first, second)


def test_step_weight_accumulates_like_a_parameter():
    weight, xs = _inputs()
    _loop(weight, xs, True).backward()
    once = weight.grad.clone()
    _loop(weight, xs, True).backward()  # a second pass adds to .grad
    torch.testing.assert_close(weight.grad, 2 * once)


def test_step_weight_without_gradient_and_under_autocast():
    weight, xs = _inputs(torch.float32)
    with torch.no_grad():
        plain = StepWeight(weight)
        assert not plain.tracked
        torch.testing.assert_close(plain(xs[0]), xs[0] @ weight.t())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = StepWeight(weight)
        y = step(xs[0])
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and xs[0].grad.dtype == torch.float32
    torch.testing.assert_close(weight.grad, torch.ones(6, 5) @ xs[0].detach(), atol=0.1, rtol=0.05)


def _regions_loop(x: torch.Tensor, scores: list[torch.Tensor], shared: bool) -> torch.Tensor:
    """Steps that read x (B, P, E) as prefixes of a shrinking batch: a context
    sum_i alpha_i x[:b, i] and the prefix itself; x is also used outside the loop, directly
    and through the StepInput."""
    reads = StepInput(x) if shared else None
    total = x.sum()
    for score in scores:  # (b, P) each
        b, alpha = score.size(0), torch.softmax(score, dim=1)  # (b, P)
        if shared:
            context, rows = reads.mix(alpha), reads.prefix(b)  # (b, E), (b, P, E)
        else:
            context, rows = torch.bmm(alpha.unsqueeze(1), x[:b]).squeeze(1), x[:b]
        total = total + (context ** 2).sum() + rows.tanh().sum()
    whole = reads.x if shared else x  # (B, P, E) read whole, through StepInput too
    return total + (whole ** 3).mean()


def _region_inputs(dtype=torch.float64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, generator=gen, dtype=dtype, requires_grad=True)  # (B, P, E)
    scores = [torch.randn(b, 3, generator=gen, dtype=dtype, requires_grad=True)
              for b in (5, 4, 4, 2, 1)]  # (b_t, P)
    return x, scores


def test_step_input_gradients_equal_autograds_and_pass_gradcheck():
    x, scores = _region_inputs()
    grads = []
    for shared in (False, True):
        for t in [x, *scores]:
            t.grad = None
        _regions_loop(x, scores, shared).backward()
        grads.append([t.grad.clone() for t in [x, *scores]])
    for plain, once in zip(*grads):
        torch.testing.assert_close(once, plain)
    assert torch.autograd.gradcheck(lambda x, *s: _regions_loop(x, list(s), True), (x, *scores))
    loss = _regions_loop(x, scores, True)
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], first)  # records refilled


def test_step_input_without_gradient_and_under_autocast():
    x, scores = _region_inputs(torch.float32)
    with torch.no_grad():
        reads = StepInput(x)
        assert not reads.tracked and reads.prefix(5) is x
        torch.testing.assert_close(reads.mix(torch.softmax(scores[1], 1)),
                                   torch.bmm(torch.softmax(scores[1], 1)[:, None], x[:4])[:, 0])
    plain = torch.autograd.grad(_regions_loop(x, scores, False), x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _regions_loop(x, scores, True)
    mine = torch.autograd.grad(loss, x)[0]
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, plain, atol=0.1, rtol=0.05)


def test_step_input_under_autocast_casts_once_to_the_same_values_and_gradients():
    """Under autocast the mixes read one low-precision copy of x, made when the StepInput
    is: the contexts and the scores' gradients are bit for bit those of autocast casting
    each step's prefix (the plain loop), and x's gradient stays in x's dtype."""
    x, scores = _region_inputs(torch.float32)
    results = []
    for shared in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if shared:
                reads = StepInput(x)
                assert reads.low.dtype == torch.bfloat16 and not reads.low.requires_grad
                assert torch.equal(reads.low, x.detach().to(torch.bfloat16))
            contexts = [(StepInput(x).mix if shared else
                         lambda a: torch.bmm(a.unsqueeze(1), x[:a.size(0)]).squeeze(1))(
                             torch.softmax(s, dim=1)) for s in scores]  # (b, E) each
        loss = sum((c.float() ** 2).sum() for c in contexts)
        results.append([torch.cat([c.flatten() for c in contexts]),
                        *torch.autograd.grad(loss, [x, *scores])])
    (plain_values, plain_dx, *plain_ds), (values, dx, *ds) = results
    assert values.dtype == torch.bfloat16 and torch.equal(values, plain_values)
    for once, plain in zip(ds, plain_ds):  # the attention scores' gradients
        assert torch.equal(once, plain)
    # x's gradient: one fp32 product over the steps (not autocast's per-step bf16 ones)
    assert dx.dtype == torch.float32
    torch.testing.assert_close(dx, plain_dx, atol=0.02, rtol=0.02)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert StepInput(x).low is None  # no gradient: plain slices, no copy
    assert StepInput(x).low is None  # no autocast: nothing to cast


def test_repeated_rows_read_like_the_repeated_tensor():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=gen)  # (B, P, E): 3 images
    k = 4
    alpha = torch.softmax(torch.randn(3 * k, 5, generator=gen), dim=1)  # (B*k, P)
    repeated = x.repeat_interleave(k, dim=0)  # (B*k, P, E): beam j of image b at b*k + j
    reads = RepeatedRows(x, k)
    torch.testing.assert_close(reads.mix(alpha), StepInput(repeated).mix(alpha))
    assert reads.repeated is None  # mix made no copy
    assert torch.equal(reads.prefix(3 * k), repeated) and torch.equal(reads.prefix(5), repeated[:5])
    with pytest.raises(ValueError, match="11 rows, not B\\*k \\+ R = 12"):
        reads.mix(alpha[:11])


def test_repeated_rows_with_extra_rows_read_like_the_stacked_tensor():
    """The riders of a beam search: rows of some images after the B*k beam rows."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 7, generator=gen)  # (B, P, E)
    k, extra = 2, torch.tensor([2, 0])  # (R,): images 2 and 0 ride
    stacked = torch.cat([x.repeat_interleave(k, dim=0), x[extra]])  # (B*k + R, P, E)
    alpha = torch.softmax(torch.randn(8, 5, generator=gen), dim=1)  # (B*k + R, P)
    reads = RepeatedRows(x, k, extra)
    assert reads.rows() == 8
    torch.testing.assert_close(reads.mix(alpha), StepInput(stacked).mix(alpha))
    assert reads.repeated is None
    assert torch.equal(reads.prefix(8), stacked) and torch.equal(reads.prefix(7), stacked[:7])
    with pytest.raises(ValueError, match="6 rows, not B\\*k \\+ R = 8"):
        reads.mix(alpha[:6])
    empty = RepeatedRows(x, k, torch.zeros(0, dtype=torch.long))  # nobody rides
    assert empty.extra is None and empty.rows() == 6


def test_a_decoder_step_on_repeated_rows_equals_the_step_on_the_copy():
    torch.manual_seed(0)
    decoder = DecoderWithAttention(9, encoder_dim=16, embed_dim=8, decoder_dim=12,
                                   attention_dim=10).eval()
    features, k = torch.randn(3, 5, 16), 2  # (B, P, E)
    repeated = features.repeat_interleave(k, dim=0)  # (B*k, P, E)
    state = decoder.init_state(repeated)  # (B*k, H) x2
    tokens = torch.tensor([1, 2, 3, 4, 5, 6])  # (B*k,)
    projected = decoder.project(repeated)  # (B*k, P, A)
    with torch.no_grad():
        want = decoder.step(tokens, state, repeated, projected)
        got = decoder.step(tokens, state, RepeatedRows(features, k), projected)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a)


def test_lstm_cell_equals_nn_lstmcell():
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 4)
    x, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    gates = x @ cell.weight_ih.t() + cell.bias_ih + h @ cell.weight_hh.t() + cell.bias_hh
    for mine, theirs in zip(lstm_cell(gates, c), cell(x, (h, c))):
        torch.testing.assert_close(mine, theirs)


def _per_step_reference(dec: DecoderWithAttention, features, captions, lengths):
    """The decoder's maths written plainly, one nn.LSTMCell call per step, whole batch."""
    T = captions.size(1) - 1
    embedded = dec.embedding(captions[:, :T])  # (B, T, D)
    h, c = dec.init_state(features)
    projected = dec.project(features)
    hiddens, alphas, zs = [], [], []
    for t in range(T):
        if dec.attention is not None:
            context, alpha = dec.attention(features, h, projected=projected)  # (B, E), (B, P)
        else:
            context, alpha = features.mean(dim=1), torch.full(features.shape[:2], 1 / 9)
        gate = torch.sigmoid(dec.f_beta(h))  # (B, E)
        h, c = dec.lstm(torch.cat([embedded[:, t], gate * context], dim=1), (h, c))
        hiddens.append(h)
        alphas.append(alpha)
        zs.append(gate * context)  # the gated context z_t
    real = (torch.arange(T).unsqueeze(0) < (lengths - 1).unsqueeze(1)).float()  # (B, T)
    alphas = torch.stack(alphas, dim=1) * real.unsqueeze(2)  # (B, T, P)
    hidden = torch.stack(hiddens, dim=1)  # (B, T, H)
    if not dec.deep_output:
        return dec.fc(hidden), alphas
    # the paper's Eq. 7: L_o(E y_{t-1} + L_h h_t + L_z z_t), a tanh before L_o
    deep = torch.tanh(embedded + dec.out_h(hidden) + dec.out_z(torch.stack(zs, dim=1)))
    return dec.fc(deep), alphas


@pytest.mark.parametrize("use_attention,deep_output", [(True, False), (False, False),
                                                       (True, True), (False, True)])
def test_decoder_values_and_gradients_equal_the_per_step_formulation(use_attention, deep_output):
    torch.manual_seed(1)
    dec = DecoderWithAttention(11, encoder_dim=8, embed_dim=5, decoder_dim=6,
                               attention_dim=7, dropout=0.0, use_attention=use_attention,
                               deep_output=deep_output)
    features = torch.randn(4, 9, 8, requires_grad=True)  # as when the encoder is tuned
    lengths = torch.tensor([6, 3, 5, 6])
    captions = torch.randint(1, 11, (4, 6)) * (torch.arange(6) < lengths.unsqueeze(1))
    grads = []
    for forward in (dec, lambda *a: _per_step_reference(dec, *a)):
        dec.zero_grad(set_to_none=True)
        features.grad = None
        logits, alphas = forward(features, captions, lengths)
        loss, _ = caption_loss(logits, captions, lengths, alphas, alpha_c=1.0)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in dec.named_parameters() if p.grad is not None})
        grads[-1]["features"] = features.grad.clone()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_decoding_follows_the_weights_after_an_update():
    """Decoding must use the current weights after the trainer's (fused) Adam step, which
    changes the parameters in place without bumping their version counters (a cache keyed
    on versions once kept a search on the old weights: validation scores froze)."""
    import copy

    from caption_lib.decoding import beam_search, greedy_decode
    from caption_lib.train import adam

    torch.manual_seed(2)
    dec = DecoderWithAttention(11, encoder_dim=8, embed_dim=5, decoder_dim=6,
                               attention_dim=7, dropout=0.0)
    features = torch.randn(3, 9, 8)
    captions, lengths = torch.randint(1, 11, (3, 5)), torch.tensor([5, 4, 5])
    optimizer = adam(dec.parameters())
    before = greedy_decode(dec, features, 1, 2, max_len=6).scores
    for _ in range(3):
        optimizer.zero_grad()
        caption_loss(*dec(features, captions, lengths)[:1], captions, lengths,
                     dec(features, captions, lengths)[1])[0].backward()
        optimizer.step()
    fresh = copy.deepcopy(dec)  # the same weights, nothing kept from earlier searches
    for search in (lambda d: greedy_decode(d, features, 1, 2, max_len=6),
                   lambda d: beam_search(d, features, 1, 2, beam_size=2, max_len=6)):
        torch.testing.assert_close(search(dec).scores, search(fresh).scores)
    assert not torch.allclose(before, greedy_decode(dec, features, 1, 2, max_len=6).scores)
