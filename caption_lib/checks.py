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
