"""Friendly checks for the exercises: compare a learner's code with the library's reference.

The graded test cells of the chapters call these. Each check runs the learner's function
and the reference on the same (random, seeded) inputs and, when they disagree, raises an
`AssertionError` whose message says in plain words what is wrong and where:

    expected shape (B, 49, 2048) = (2, 49, 2048), got (2, 2048, 49)
    alpha must sum to 1 over the 49 regions, got sums like 0.73 (row 0); is the softmax ...
    output differs from the reference: max abs difference 0.31 at (1, 4): got 0.12, expected 0.43
    no gradient reaches `features`: did you use .detach(), .item(), .numpy() or torch.no_grad()?

Generic building blocks: `check_shape`, `check_close`, `check_normalised`, `check_function`
(with `gradients=True` it also compares the gradients). Checks for chapter exercises:
`check_encode` (ch. 1), `check_cell_mask` (ch. 1), `check_regions_from_map` (ch. 2),
`check_attention_forward` (ch. 3), `check_decode_step` (ch. 4).

Shapes: B batch, P regions (49 = 7x7), E encoder dim (2048), H decoder dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Inputs = tuple | dict


def _describe(value: Any) -> str:
    """A short description of an input or output, for messages."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _position(flat_index: int, shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), tuple(shape)))


def check_shape(tensor: Any, expected: Sequence[int | None], name: str = "output",
                letters: str | None = None) -> None:
    """Fail unless `tensor` is a tensor of shape `expected` (None = any size there).

    `letters` (e.g. "(B, 49, 2048)") is shown next to the numbers.
    """
    if not isinstance(tensor, torch.Tensor):
        # checks fail with AssertionError (what graders count as a failed test)
        raise AssertionError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")  # noqa: TRY004
    got = tuple(tensor.shape)
    want = tuple(expected)
    if len(got) == len(want) and all(w is None or g == w for g, w in zip(got, want)):
        return
    shown = tuple("any" if w is None else w for w in want)
    label = f"{letters} = {shown}" if letters else f"{shown}"
    hint = ""
    if sorted(got) == sorted(w for w in want if w is not None) and len(got) == len(want):
        hint = " (the right sizes in the wrong order: check your permute/transpose)"
    elif len(got) != len(want):
        hint = f" ({len(got)} dimensions instead of {len(want)})"
    raise AssertionError(f"{name}: expected shape {label}, got {got}{hint}")


def check_close(actual: Any, expected: torch.Tensor, name: str = "output",
                atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Fail unless `actual` has `expected`'s shape and values (exactly, for int/bool)."""
    check_shape(actual, expected.shape, name)
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    if expected.is_floating_point():
        if not actual.is_floating_point():
            raise AssertionError(f"{name}: expected floating-point values, got {actual.dtype}")
        if not torch.isfinite(actual).all():
            bad = int((~torch.isfinite(actual)).flatten().nonzero()[0])
            pos = _position(bad, actual.shape)
            raise AssertionError(f"{name} has a non-finite value at {pos}: {actual[pos].item()}")
        diff = (actual.double() - expected.double()).abs()  # same shape as expected
        ok = diff <= atol + rtol * expected.double().abs()
        if ok.all():
            return
        worst = int(diff.flatten().argmax())
        pos = _position(worst, expected.shape)
        raise AssertionError(
            f"{name} differs from the reference: max abs difference {diff.max().item():.3g} "
            f"at {pos}: got {actual[pos].item():.4g}, expected {expected[pos].item():.4g} "
            f"({int((~ok).sum())} of {ok.numel()} values wrong)")
    wrong = actual != expected.to(actual.dtype)  # same shape as expected
    if wrong.any():
        pos = _position(int(wrong.flatten().nonzero()[0]), expected.shape)
        raise AssertionError(
            f"{name} differs from the reference at {int(wrong.sum())} of {wrong.numel()} "
            f"positions, e.g. at {pos}: got {actual[pos].item()}, expected {expected[pos].item()}")


def check_normalised(weights: torch.Tensor, dim: int = -1, name: str = "alpha",
                     what: str = "regions", atol: float = 1e-5) -> None:
    """Fail unless `weights` are >= 0 and sum to 1 along `dim` (e.g. alpha (B, P) over P)."""
    n = weights.shape[dim]
    if (weights < 0).any():
        raise AssertionError(f"{name} must not be negative, got {weights.min().item():.3g} "
                             f"(a softmax gives weights in [0, 1])")
    sums = weights.detach().sum(dim=dim).double()  # weights' shape without `dim`
    off = (sums - 1).abs()
    if (off > atol).any():
        worst = int(off.flatten().argmax())
        pos = _position(worst, sums.shape)
        where = f"row {pos[0]}" if len(pos) == 1 else f"at {pos}"
        raise AssertionError(
            f"{name} must sum to 1 over the {n} {what}, got sums like "
            f"{sums.flatten()[worst].item():.4g} ({where}); "
            f"is the softmax over the right dimension?")


def _compare(actual: Any, expected: Any, name: str) -> None:
    """Compare outputs: tensors with `check_close`, tuples/lists item by item, else ==."""
    if isinstance(expected, torch.Tensor):
        check_close(actual, expected, name)
    elif isinstance(expected, (tuple, list)) and any(
            isinstance(e, (torch.Tensor, tuple, list)) for e in expected):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            raise AssertionError(f"{name}: expected {len(expected)} values, got {_describe(actual)}")
        for k, (a, e) in enumerate(zip(actual, expected)):
            _compare(a, e, f"{name}[{k}]")
    elif isinstance(expected, list):
        if not isinstance(actual, list):
            raise AssertionError(f"{name}: expected a list, got {type(actual).__name__}")  # noqa: TRY004
        for k, (a, e) in enumerate(zip(actual, expected)):
            if a != e:
                raise AssertionError(f"{name} differs at index {k}: got {a!r}, expected {e!r}")
        if len(actual) != len(expected):
            raise AssertionError(f"{name}: expected {len(expected)} items, got {len(actual)}")
    elif actual != expected:
        raise AssertionError(f"{name}: got {_describe(actual)}, expected {_describe(expected)}")


def _call(fn: Callable, inputs: Inputs) -> Any:
    return fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)


def _named(inputs: Inputs) -> dict[str, Any]:
    return dict(inputs) if isinstance(inputs, dict) else {f"arg{k}": v for k, v in enumerate(inputs)}


def _with_grad(inputs: Inputs) -> Inputs:
    """Fresh leaf copies of the floating-point tensor inputs, with requires_grad."""
    def leaf(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().clone().requires_grad_(True)
        return v
    if isinstance(inputs, dict):
        return {k: leaf(v) for k, v in inputs.items()}
    return tuple(leaf(v) for v in inputs)


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    return []


def _check_gradients(fn: Callable, reference: Callable, inputs: Inputs, seed: int) -> None:
    """Backpropagate the same random weighting of both outputs; compare input gradients."""
    mine_in, ref_in = _with_grad(inputs), _with_grad(inputs)
    mine_out, ref_out = _tensors(_call(fn, mine_in)), _tensors(_call(reference, ref_in))
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(r.shape, generator=g, dtype=r.dtype) for r in ref_out]
    leaves = {k: v for k, v in _named(mine_in).items() if isinstance(v, torch.Tensor)
              and v.requires_grad}
    ref_leaves = [v for k, v in _named(ref_in).items() if k in leaves]
    if not any(m.requires_grad for m in mine_out):
        raise AssertionError("no gradient flows through your output: did you use .detach(), "
                             ".item(), .numpy() or torch.no_grad()?")
    mine_loss = sum((m * w).sum() for m, w in zip(mine_out, weights) if m.requires_grad)
    ref_loss = sum((r * w).sum() for r, w in zip(ref_out, weights))
    mine_grads = torch.autograd.grad(mine_loss, list(leaves.values()), allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves, allow_unused=True)
    for name, mine, ref in zip(leaves, mine_grads, ref_grads):
        if ref is None:
            continue
        if mine is None:
            raise AssertionError(f"no gradient reaches `{name}`: did you use .detach(), .item(), "
                                 f".numpy() or torch.no_grad() on it?")
        check_close(mine, ref, f"the gradient with respect to `{name}`", atol=1e-4, rtol=1e-3)


def check_function(fn: Callable, reference: Callable, make_inputs: Callable[[torch.Generator], Inputs],
                   trials: int = 5, seed: int = 0, name: str | None = None,
                   gradients: bool = False) -> None:
    """Compare `fn` with `reference` on `trials` random inputs.

    Args:
        fn: the learner's function.
        reference: the library's function (same arguments, same outputs).
        make_inputs: `make_inputs(generator)` returns the arguments, a tuple (positional)
            or a dict (keywords); draw random values from `generator` only.
        trials: how many inputs to try.
        seed: seed of the generator passed to `make_inputs`.
        name: how to call `fn` in messages (default: its __name__).
        gradients: also compare the gradients with respect to floating-point inputs.
    """
    name = name or getattr(fn, "__name__", "your function")
    generator = torch.Generator().manual_seed(seed)
    for trial in range(trials):
        inputs = make_inputs(generator)
        shown = ", ".join(f"{k}={_describe(v)}" for k, v in _named(inputs).items())
        try:
            with torch.no_grad():
                expected = _call(reference, inputs)
                actual = _call(fn, inputs)
            _compare(actual, expected, f"{name}(...)")
            if gradients:
                _check_gradients(fn, reference, inputs, seed + trial)
        except AssertionError as err:
            raise AssertionError(f"{err}\n  (trial {trial + 1} of {trials}, inputs: {shown})") from None


# -- checks for the chapters' exercises ---------------------------------------------------

def check_encode(encode: Callable, vocab: Any, trials: int = 20, seed: int = 0,
                 texts: Sequence[str] = ()) -> None:
    """Chapter 1: `encode(text, stoi)` must equal `vocab.encode(text)` (`<start> ... <end>`)."""
    g = torch.Generator().manual_seed(seed)
    words = list(vocab.itos[4:]) + ["zebra", "Purple", "circle,", "."]
    randoms = [" ".join(words[int(i)] for i in torch.randint(len(words), (int(n),), generator=g))
               for n in torch.randint(0, 12, (trials,), generator=g)]
    for text in [*texts, *randoms]:
        got, want = encode(text, vocab.stoi), vocab.encode(text)
        if got == want:
            continue
        hint = ""
        if not isinstance(got, list):
            hint = f"return a list of ints, not {type(got).__name__}"
        elif not got or got[0] != vocab.start_id:
            hint = f"the ids must start with <start> ({vocab.start_id})"
        elif got[-1] != vocab.end_id:
            hint = f"the ids must end with <end> ({vocab.end_id})"
        elif vocab.unk_id in want and vocab.unk_id not in got:
            hint = f"words not in the vocabulary map to <unk> ({vocab.unk_id})"
        elif len(got) != len(want):
            hint = f"expected {len(want)} ids (the words plus <start> and <end>), got {len(got)}"
        else:
            hint = "did you tokenize (lower case, punctuation dropped)?"
        raise AssertionError(f"encode({text!r}): expected {want}, got {got}: {hint}")


def check_cell_mask(cell_mask: Callable, trials: int = 100, seed: int = 0,
                    boxes: Sequence[Sequence[int]] = ()) -> None:
    """Chapter 1: `cell_mask(box)` must equal `object_cell_mask(box)`, a (7, 7) bool tensor."""
    from caption_lib.shapes import object_cell_mask

    g = torch.Generator().manual_seed(seed)
    randoms = []
    for _ in range(trials):
        x0, y0 = (int(v) for v in torch.randint(0, 200, (2,), generator=g))
        x1 = x0 + int(torch.randint(1, 225 - x0, (1,), generator=g))
        y1 = y0 + int(torch.randint(1, 225 - y0, (1,), generator=g))
        randoms.append([x0, y0, x1, y1])
    for box in [*boxes, *randoms]:
        got, want = cell_mask(list(box)), object_cell_mask(list(box))
        check_shape(got, (7, 7), f"cell_mask({list(box)})")
        if not torch.equal(got.bool(), want):
            raise AssertionError(f"cell_mask({list(box)}) covers cells {got.nonzero().tolist()}, "
                                 f"expected {want.nonzero().tolist()} (row, column)")


def _regions_reference(fmap: torch.Tensor) -> torch.Tensor:
    return fmap.permute(0, 2, 3, 1).reshape(fmap.size(0), -1, fmap.size(1))  # (B, H*W, C)


def check_regions_from_map(regions_from_map: Callable, trials: int = 3, seed: int = 0) -> None:
    """Chapter 2: `(B, C, H, W) -> (B, H*W, C)`, region r = cell (r // W, r % W)."""
    with torch.no_grad():
        fmap = torch.randn(2, 2048, 7, 7, generator=torch.Generator().manual_seed(seed))
        check_shape(regions_from_map(fmap), (2, 49, 2048), "regions_from_map(fmap (2, 2048, 7, 7))",
                    letters="(B, 49, 2048)")

    def inputs(g: torch.Generator) -> tuple:
        b, c, h, w = (int(v) for v in torch.randint(1, 9, (4,), generator=g))
        return (torch.randn(b, c, h, w + 1, generator=g),)  # non-square: rows vs columns

    check_function(regions_from_map, _regions_reference, inputs, trials=trials, seed=seed,
                   name="regions_from_map", gradients=True)


def check_attention_forward(attention_forward: Callable, trials: int = 3, seed: int = 0) -> None:
    """Chapter 3: `attention_forward(att, features, hidden, projected=None, mask=None)`.

    Must return `(context (B, E), alpha (B, P))` equal to `att(features, hidden, ...)`,
    with alpha normalised, zero on masked regions, and the same gradients.
    """
    from caption_lib.attention import Attention

    with torch.random.fork_rng(devices=[]):  # the learner's random state is left alone
        torch.manual_seed(seed)
        att = Attention(16, 8, 12)
    g = torch.Generator().manual_seed(seed)
    features, hidden = torch.randn(2, 49, 16, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        out = attention_forward(att, features, hidden)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise AssertionError(f"attention_forward must return (context, alpha), got {_describe(out)}")
    context, alpha = out
    check_shape(context, (2, 16), "context", letters="(B, E)")
    check_shape(alpha, (2, 49), "alpha", letters="(B, P)")
    check_normalised(alpha, dim=1, name="alpha", what="regions")

    def inputs(g: torch.Generator) -> dict:
        b, p = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
        f, h = torch.randn(b, p, 16, generator=g), torch.randn(b, 8, generator=g)
        mask = torch.rand(b, p, generator=g) > 0.4  # (B, P)
        mask[:, 0] = True
        return {"features": f, "hidden": h, "projected": att.project(f).detach(), "mask": mask}

    for keys in [("features", "hidden"), ("features", "hidden", "projected"),
                 ("features", "hidden", "mask")]:
        def pick(g: torch.Generator, keys: tuple = keys) -> dict:
            return {k: v for k, v in inputs(g).items() if k in keys}

        check_function(lambda **kw: attention_forward(att, **kw), att, pick, trials=trials,
                       seed=seed, name=f"attention_forward with {', '.join(keys)}",
                       gradients=True)


def check_decode_step(decode_step: Callable, steps: int = 4, seed: int = 0) -> None:
    """Chapter 4: `decode_step(dec, tokens, state, features, projected)` equals `dec.step`.

    Runs `steps` steps, feeding each function its own state back, and compares the
    logits (B, V), the new state (h, c) and alpha (B, P) at every step.
    """
    from caption_lib.decoder import DecoderWithAttention

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = DecoderWithAttention(12, encoder_dim=6, embed_dim=5, decoder_dim=4,
                                   attention_dim=3).eval()
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 7, 6, generator=g)  # (B, P, E)
    with torch.no_grad():
        projected = dec.project(features)  # (B, P, A)
        mine = ref = dec.init_state(features)
        for t in range(steps):
            tokens = torch.randint(0, 12, (2,), generator=g)  # (B,)
            out = decode_step(dec, tokens, mine, features, projected)
            want = dec.step(tokens, ref, features, projected)
            if not isinstance(out, (tuple, list)) or len(out) != 3:
                raise AssertionError("decode_step must return (logits, (h, c), alpha), got "
                                     f"{_describe(out)}")
            check_shape(out[0], (2, 12), f"logits at step {t}", letters="(B, V)")
            check_normalised(out[2], dim=1, name=f"alpha at step {t}")
            _compare(out, want, f"decode_step at step {t}")
            mine, ref = out[1], want[1]


# -- plain values, and the per-exercise summary a student hands in ------------------------

def check_equal(actual: Any, expected: Any, name: str, hint: str = "") -> None:
    """Fail unless `actual == expected` (tensors: `check_close`); `hint` says why it matters."""
    try:
        _compare(actual, expected, name)
    except AssertionError as err:
        raise AssertionError(f"{err}{': ' + hint if hint else ''}") from None


_PASSED: dict[str, bool] = {}


def passed(exercise: str) -> None:
    """The last line of a graded test cell: prints "Exercise N: correct" and records it."""
    _PASSED[exercise] = True
    print(f"{exercise}: correct")


def summary(points: dict[str, int]) -> dict[str, bool]:
    """Print one line per exercise (correct / not yet) and the visible-test total.

    `points` maps "Exercise N" to its points (the notebook's nbgrader metadata). What
    counts is whether the exercise's test cell ran to its end in this session; the
    hidden tests, which only the grader runs, can still fail.
    """
    done = {name: _PASSED.get(name, False) for name in points}
    for name, ok in done.items():
        state = "correct" if ok else "not yet (run its test cell to see what is wrong)"
        print(f"{name} ({points[name]} points): {state}")
    got = sum(points[n] for n, ok in done.items() if ok)
    print(f"visible tests passed: {got} of {sum(points.values())} points "
          f"(the grader's hidden tests decide the grade)")
    return done


# -- checks for the chapters' tasks --------------------------------------------------------

def check_recalibrate(recalibrate: Callable, trials: int = 3, seed: int = 0) -> None:
    """Chapter 2: `recalibrate(net, batches) -> n` re-estimates every BatchNorm's statistics.

    Compares running mean/variance, momentum and mode afterwards, and the returned sample
    count with `caption_lib.encoder.recalibrate_bn_statistics`; the weights must not change.
    """
    import copy

    from caption_lib.encoder import recalibrate_bn_statistics

    g = torch.Generator().manual_seed(seed)
    for trial in range(trials):
        c = int(torch.randint(2, 6, (1,), generator=g))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + trial)
            net = torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.BatchNorm2d(c),
                                      torch.nn.ReLU(), torch.nn.Conv2d(c, c, 1),
                                      torch.nn.BatchNorm2d(c, momentum=0.3))
        for m in net.modules():  # stale statistics, as after training
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(5.0)
                m.running_var.fill_(9.0)
        net.train(trial % 2 == 0)
        sizes = torch.randint(1, 6, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        batches = [torch.randn(int(n) + 1, 3, 4, 5, generator=g) * 2 + 1 for n in sizes]
        mine, ref = copy.deepcopy(net), copy.deepcopy(net)
        seen = recalibrate(mine, iter(batches))
        want = recalibrate_bn_statistics(ref, iter(batches))
        where = f"(trial {trial + 1} of {trials}: {len(batches)} batches)"
        _check_bn_state(mine, ref, seen, want, where)


def _check_bn_state(mine: torch.nn.Module, ref: torch.nn.Module, seen: Any, want: int,
                    where: str) -> None:
    """Compare the BatchNorm state of two recalibrated copies of a network."""
    for (name, a), b in zip(mine.named_modules(), ref.modules()):
        if not isinstance(b, torch.nn.BatchNorm2d):
            continue
        if a.momentum != b.momentum:
            raise AssertionError(f"{name}: momentum is {a.momentum} afterwards, expected "
                                 f"{b.momentum}: set it back once the statistics are done {where}")
        if torch.allclose(a.running_mean, b.running_mean * 0 + 5.0):
            raise AssertionError(f"{name}: the running mean did not change: reset the statistics "
                                 f"and run the batches in train mode {where}")
        try:
            check_close(a.running_mean, b.running_mean, f"{name}.running_mean", atol=1e-4)
            check_close(a.running_var, b.running_var, f"{name}.running_var", atol=1e-4)
        except AssertionError as err:
            raise AssertionError(f"{err}: every batch must count equally (momentum=None gives "
                                 f"that average) {where}") from None
    for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
        if not torch.equal(p, q):
            raise AssertionError(f"the weight {name} changed: only the statistics may {where}")
    if mine.training != ref.training:
        raise AssertionError(f"the network must be back in {'train' if ref.training else 'eval'}"
                             f" mode afterwards, as it was before {where}")
    check_equal(seen, want, "the returned number of samples", where)


def _lstm_reference(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """nn.LSTMCell with the given weights: (h', c')."""
    cell = torch.nn.LSTMCell(x.size(1), h.size(1)).to(x.dtype)
    del cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
    cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh = w_ih, w_hh, b_ih, b_hh
    return cell(x, (h, c))


def _lstm_gate_order(x, h, c, w_ih, w_hh, b_ih, b_hh, order):
    """An LSTM step with the four gate blocks taken in `order` (for diagnosing mistakes)."""
    def pick(t):
        return torch.cat([t.chunk(4, dim=0)[k] for k in order], dim=0)
    return _lstm_reference(x, h, c, pick(w_ih), pick(w_hh), pick(b_ih), pick(b_hh))


def _lstm_inputs(g: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple:
    b, d, n = (int(v) for v in torch.randint(1, 6, (3,), generator=g))
    n += 1

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    return r(b, d), r(b, n), r(b, n), r(4 * n, d) / d ** 0.5, r(4 * n, n) / n ** 0.5, r(4 * n), r(4 * n)


def check_lstm_step(lstm_step: Callable, trials: int = 5, seed: int = 0,
                    gradcheck: bool = True) -> None:
    """Chapter 4: `lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh) -> (h', c')` equals nn.LSTMCell.

    Values and gradients (with respect to every input) on random sizes, then
    `torch.autograd.gradcheck` in float64: analytical against numerical gradients.
    """
    g = torch.Generator().manual_seed(seed)
    inputs = _lstm_inputs(g)
    with torch.no_grad():
        out = lstm_step(*inputs)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise AssertionError(f"lstm_step must return (h, c), got {_describe(out)}")
        want = _lstm_reference(*inputs)
        check_shape(out[0], want[0].shape, "h'", letters="(B, H)")
        check_shape(out[1], want[1].shape, "c'", letters="(B, H)")
        if torch.allclose(out[0], want[1], atol=1e-5) and not torch.allclose(out[0], want[0]):
            raise AssertionError("you return (c, h): return the hidden state h first, then c")
        for order, name in [((0, 1, 3, 2), "input, forget, output, cell"),
                            ((1, 0, 2, 3), "forget, input, cell, output")]:
            alt = _lstm_gate_order(*inputs, order)
            if torch.allclose(out[0], alt[0], atol=1e-5) and not torch.allclose(out[0], want[0]):
                raise AssertionError(f"the gates are in the order {name}: PyTorch stacks the rows "
                                     "of the weights as input, forget, cell (g), output")
    names = ("x", "h", "c", "w_ih", "w_hh", "b_ih", "b_hh")
    check_function(lstm_step, _lstm_reference, lambda g: dict(zip(names, _lstm_inputs(g))),
                   trials=trials, seed=seed, name="lstm_step", gradients=True)
    if gradcheck:
        double = _lstm_inputs(torch.Generator().manual_seed(seed), torch.float64)
        double = tuple(t.requires_grad_(True) for t in double)
        try:
            ok = torch.autograd.gradcheck(lambda *a: tuple(lstm_step(*a)), double,
                                          raise_exception=False)
        except RuntimeError as err:
            raise AssertionError(f"torch.autograd.gradcheck could not run lstm_step: "
                                 f"{str(err).splitlines()[0]}") from None
        if not ok:
            raise AssertionError("lstm_step's analytical gradients disagree with numerical ones "
                                 "(torch.autograd.gradcheck in float64): an in-place or "
                                 "non-differentiable operation?")


def _dot_reference(module: torch.nn.Module, features: torch.Tensor, hidden: torch.Tensor,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with `module.key` (E -> A) and `module.query` (H -> A)."""
    keys = module.key(features)  # (B, P, A)
    query = module.query(hidden)  # (B, A)
    scores = (keys @ query.unsqueeze(2)).squeeze(2) / keys.size(2) ** 0.5  # (B, P)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    alpha = torch.softmax(scores, dim=1)  # (B, P)
    return (alpha.unsqueeze(2) * features).sum(dim=1), alpha  # (B, E), (B, P)


def check_dot_attention(cls: type, trials: int = 3, seed: int = 0) -> None:
    """Chapter 3: `cls(E, H, A)` with layers `key`, `query` computes scaled dot-product
    attention, `forward(features, hidden, mask=None) -> (context, alpha)`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        att = cls(16, 8, 6)
    g = torch.Generator().manual_seed(seed)
    features, hidden = torch.randn(2, 49, 16, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        out = att(features, hidden)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise AssertionError(f"forward must return (context, alpha), got {_describe(out)}")
    check_shape(out[0], (2, 16), "context", letters="(B, E)")
    check_shape(out[1], (2, 49), "alpha", letters="(B, P)")
    check_normalised(out[1], dim=1, name="alpha", what="regions")
    with torch.no_grad():
        keys, query = att.key(features), att.query(hidden)  # (B, P, A), (B, A)
        unscaled = torch.softmax((keys @ query.unsqueeze(2)).squeeze(2), dim=1)  # (B, P)
    if torch.allclose(out[1], unscaled, atol=1e-6):
        raise AssertionError("alpha is the softmax of unscaled dot products: divide the "
                             "scores by sqrt(A) (A = attention_dim)")

    def inputs(g: torch.Generator) -> dict:
        b, p = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
        mask = torch.rand(b, p, generator=g) > 0.4  # (B, P)
        mask[:, 0] = True
        return {"features": torch.randn(b, p, 16, generator=g),
                "hidden": torch.randn(b, 8, generator=g), "mask": mask}

    for with_mask in (False, True):
        def pick(g: torch.Generator, with_mask: bool = with_mask) -> dict:
            kw = inputs(g)
            return kw if with_mask else {k: v for k, v in kw.items() if k != "mask"}

        check_function(att, lambda **kw: _dot_reference(att, **kw), pick, trials=trials,
                       seed=seed, gradients=True,
                       name=f"forward({'features, hidden, mask' if with_mask else 'features, hidden'})")


def _steps_inputs(g: torch.Generator, p: int = 7) -> tuple:
    """Random alphas (B, T, P) of captions of random lengths and their step mask (B, T)."""
    from caption_lib.decoder import step_mask

    b = int(torch.randint(1, 6, (1,), generator=g))
    lengths = torch.randint(2, 9, (b,), generator=g)  # (B,)
    lengths[0] = 8
    t = int(lengths.max()) - 1
    alphas = torch.softmax(3 * torch.randn(b, t, p, generator=g), dim=2)  # (B, T, P)
    return alphas, step_mask(lengths, t), lengths


def _penalty_reference(alphas: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * mean_b sum_i (1 - sum_{t real} alpha_bti)^2, as `caption_loss` computes it."""
    total = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, P)
    return lam * ((1 - total) ** 2).sum(dim=1).mean()


def check_attention_penalty(attention_penalty: Callable, trials: int = 5, seed: int = 0) -> None:
    """Chapter 5: `attention_penalty(alphas (B, T, P), mask (B, T), lam)` equals
    `lam` times `caption_loss`'s regulariser, on random lengths and lambdas, with gradients."""
    reference = _penalty_reference

    g = torch.Generator().manual_seed(seed)
    alphas, mask, _ = _steps_inputs(g)
    with torch.no_grad():
        got = attention_penalty(alphas, mask, 2.0)
    check_shape(got, (), "attention_penalty(...)", letters="a scalar")
    for name, wrong, hint in [
            ("unmasked", 2.0 * ((1 - alphas.sum(dim=1)) ** 2).sum(dim=1).mean(),
             "the padded steps count: multiply alphas by the mask before summing over t"),
            ("summed", 2.0 * ((1 - (alphas * mask.unsqueeze(2)).sum(dim=1)) ** 2).sum(),
             "take the mean over the batch, not the sum"),
            ("per step", 2.0 * ((1 - alphas) ** 2 * mask.unsqueeze(2)).sum(dim=(1, 2)).mean(),
             "sum alpha over the steps first, then square 1 - that sum")]:
        if abs(float(got) - float(wrong)) < 1e-5 and abs(float(wrong) - float(reference(alphas, mask, 2.0))) > 1e-4:
            raise AssertionError(f"attention_penalty(...) = {float(got):.4g}, expected "
                                 f"{float(reference(alphas, mask, 2.0)):.4g}: {hint}")

    def inputs(g: torch.Generator) -> tuple:
        alphas, mask, _ = _steps_inputs(g)
        return alphas, mask, float(torch.rand(1, generator=g) * 4 + 0.1)

    check_function(attention_penalty, reference, inputs, trials=trials, seed=seed,
                   name="attention_penalty", gradients=True)


def check_masked_xent(masked_xent: Callable, trials: int = 5, seed: int = 0) -> None:
    """Chapter 4: `masked_xent(logits (B, T, V), captions (B, L), lengths (B,))` equals
    `caption_loss`'s cross-entropy (real tokens only), with gradients."""
    from caption_lib.decoder import caption_loss

    def reference(logits, captions, lengths):
        loss, _ = caption_loss(logits, captions, lengths, torch.zeros(*logits.shape[:2], 1),
                               alpha_c=0.0)
        return loss

    def inputs(g: torch.Generator) -> tuple:
        _, mask, lengths = _steps_inputs(g)
        v = int(torch.randint(4, 12, (1,), generator=g))
        captions = torch.randint(1, v, (mask.size(0), mask.size(1) + 1), generator=g)
        captions[~torch.cat([torch.ones(mask.size(0), 1, dtype=torch.bool), mask], 1)] = 0
        return torch.randn(*mask.shape, v, generator=g), captions, lengths

    logits, captions, lengths = inputs(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = masked_xent(logits, captions, lengths)
    check_shape(got, (), "masked_xent(...)", letters="a scalar")
    everywhere = torch.nn.functional.cross_entropy(logits.flatten(0, 1), captions[:, 1:].flatten())
    if abs(float(got) - float(everywhere)) < 1e-5 and (lengths < lengths.max()).any():
        raise AssertionError("masked_xent(...) averages over all B*T positions: padded steps "
                             "must not count (keep t < lengths[b] - 1 only)")
    check_function(masked_xent, reference, inputs, trials=trials, seed=seed,
                   name="masked_xent", gradients=True)


def check_clip_grad_norm(clip: Callable, trials: int = 5, seed: int = 0) -> None:
    """Chapter 5: `clip(grads, max_norm) -> (clipped grads, total norm)` equals
    `torch.nn.utils.clip_grad_norm_` (one norm over all tensors together)."""
    def reference(grads, max_norm):
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
        for p, t in zip(params, grads):
            p.grad = t.clone()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return [p.grad for p in params], norm

    def inputs(g: torch.Generator) -> tuple:
        n = int(torch.randint(1, 4, (1,), generator=g))
        grads = [torch.randn(*(int(s) for s in torch.randint(1, 5, (2,), generator=g)),
                             generator=g) for _ in range(n)]
        return grads, float(torch.rand(1, generator=g) * 4 + 0.5)

    grads = [torch.full((2, 2), 3.0), torch.full((3,), 4.0)]
    out = clip([t.clone() for t in grads], 1.0)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise AssertionError(f"clip must return (clipped gradients, total norm), got {_describe(out)}")
    clipped = out[0]
    separately = [t / t.norm() for t in grads]
    if isinstance(clipped, (list, tuple)) and len(clipped) == 2 and all(
            isinstance(a, torch.Tensor) and torch.allclose(a, b) for a, b in zip(clipped, separately)):
        raise AssertionError("each tensor is clipped on its own: clip by one norm over all "
                             "gradients together (sqrt of the sum of squares of all of them)")
    check_function(clip, reference, inputs, trials=trials, seed=seed, name="clip_grad_norm")
    small = [torch.full((2,), 0.1)]
    check_equal(clip([t.clone() for t in small], 1.0)[0], small, "clip([small gradient], 1.0)",
                "gradients whose norm is below max_norm stay as they are")


def _bleu_inputs(g: torch.Generator) -> tuple:
    words = ["a", "big", "small", "red", "blue", "green", "circle", "square", "triangle",
             "left", "of"]

    def sentence(n):
        return [words[int(i)] for i in torch.randint(len(words), (n,), generator=g)]
    hyp = sentence(int(torch.randint(4, 12, (1,), generator=g)))
    refs = []
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        ref = list(hyp) if torch.rand(1, generator=g) < 0.5 else sentence(4)
        keep = torch.rand(len(ref), generator=g) > 0.2  # drop some words
        extra = sentence(int(torch.randint(0, 6, (1,), generator=g)))
        refs.append([w for w, k in zip(ref, keep) if k] + extra)
    return refs, hyp


def check_bleu4(bleu4: Callable, trials: int = 200, seed: int = 0) -> None:
    """Chapter 6: `bleu4(references, hypothesis)` (one sentence, 0-100) equals
    `caption_lib.metrics.bleu` on random sentences; names clipping or brevity if missed."""
    from caption_lib.metrics import bleu

    cases = [([["a", "red", "circle", "and", "a", "square"]], ["a", "a", "a", "a", "a"]),
             ([["a", "big", "red", "circle", "left", "of", "a", "square"]],
              ["a", "big", "red", "circle"])]
    g = torch.Generator().manual_seed(seed)
    cases += [_bleu_inputs(g) for _ in range(trials)]
    for refs, hyp in cases:
        want = bleu([refs], [hyp])["bleu4"]
        want = 0.0 if want < 1e-6 else want  # nltk returns ~1e-70 for "no match"
        got = float(bleu4(refs, hyp))
        if abs(got - want) <= 1e-6 * max(1.0, want):
            continue
        hint = "see eq. (eq-bleu)"
        if refs == cases[0][0] and hyp == cases[0][1]:
            hint = "count each n-gram at most as often as it occurs in one reference (clipping)"
        elif refs == cases[1][0] and hyp == cases[1][1]:
            hint = "a caption shorter than its closest reference pays the brevity penalty"
        raise AssertionError(f"bleu4({refs}, {hyp}) = {got:.4g}, expected {want:.4g}: {hint}")
