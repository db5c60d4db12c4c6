"""A weight used at every step of a loop, with its gradient computed in one matrix product.

The decoder multiplies the same weight W (N, K) by a new input x_t (b_t, K) at every step
t of its loop. Autograd's ordinary backward then computes, for every step, a weight
gradient dW_t = g_t^T x_t (g_t = dLoss/dy_t, (b_t, N)) and adds it to W.grad: T matrix
products with an inner size of only b_t (the batch, 32) and T read-modify-writes of the
whole (N, K) gradient. Both are memory-bound on a CPU; at the book's sizes they were about
a fifth of a decoder training step (`benchmarks/bench_decoder.py`).

`StepWeight` computes the same sum once, as one product over all steps:

    dW = sum_t g_t^T x_t = [g_1; ...; g_T]^T [x_1; ...; x_T]      (N, sum_t b_t) x (sum_t b_t, K)

How: every step's product is an autograd Function (`_StepProduct`) whose backward returns
the input gradient g_t W at once and only *records* (x_t, g_t). The weight reaches the
steps through another Function (`_Collect`) that autograd runs after all of them (it
comes before them in the forward pass); its backward stacks what was recorded and returns
dW to W as an ordinary gradient, so `loss.backward()`, gradient accumulation and
data-parallel hooks see nothing unusual. Under autocast the weight is cast once per loop
(not once per step) to the autocast dtype; gradients come back in W's dtype.

Shapes: W (N, K); x_t (b_t, K); y_t = x_t W^T (b_t, N).

`StepInput` does the same for an input every step reads as a prefix x[:b_t] of its rows
(the region features and their projection W_a a, while the batch shrinks): autograd's
slice backward would zero-fill a gradient of the whole x at every step and add it to the
total; here each step adds its rows into one buffer in place. The context
z_t = sum_i alpha_ti a_i is such a read too; its gradient for the features,
sum_t alpha_t g_t^T per caption, becomes one batched product after the loop.
"""

from __future__ import annotations

import torch


class _Collect(torch.autograd.Function):
    """weight -> the weight in the compute dtype; backward: sum_t g_t^T x_t in one product."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, dtype: torch.dtype, records: list) -> torch.Tensor:
        ctx.records, ctx.weight_dtype = records, weight.dtype
        ctx.set_materialize_grads(False)  # the steps return no weight gradient: None, not 0
        return weight.to(dtype) if dtype != weight.dtype else weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        records = ctx.records  # filled by the steps' backward, which autograd ran first
        if not records:
            return grad, None, None
        inputs = torch.cat([x for x, _ in records])  # (sum b_t, K)
        outputs = torch.cat([g for _, g in records])  # (sum b_t, N)
        records.clear()
        dweight = (outputs.t() @ inputs).to(ctx.weight_dtype)  # (N, K), one product
        return (dweight if grad is None else dweight + grad.to(ctx.weight_dtype)), None, None


class _StepProduct(torch.autograd.Function):
    """y = x W^T for one step; backward: the input gradient now, the weight's recorded."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, records: list) -> torch.Tensor:
        x = x.to(weight.dtype)  # (b, K)
        ctx.save_for_backward(x, weight)
        ctx.records = records
        return x @ weight.t()  # (b, N)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors  # (b, K), (N, K)
        grad = grad.to(weight.dtype)  # (b, N)
        ctx.records.append((x, grad))
        return grad @ weight, None, None  # (b, K); the weight's part goes to _Collect


class StepWeight:
    """`weight` (N, K) prepared for the steps of one loop: `self(x)` is x W^T (b, N).

    Make one per forward pass (not per step): the gradient of W is the one product over
    all the steps this object served. Without gradient (evaluation, `torch.no_grad`) it is
    a plain product. Under autocast the product runs in the autocast dtype, like
    `nn.Linear`'s.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        device = weight.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else weight.dtype)
        self.tracked = torch.is_grad_enabled() and weight.requires_grad
        self.records: list = []
        if self.tracked:
            self.weight = _Collect.apply(weight, dtype, self.records)  # (N, K)
        else:
            self.weight = weight.to(dtype)  # (N, K)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.tracked and torch.is_grad_enabled():
            with torch.autocast(x.device.type, enabled=False):  # dtype chosen above
                return _StepProduct.apply(x, self.weight, self.records)  # (b, N)
        return x.to(self.weight.dtype) @ self.weight.t()  # (b, N)


def first_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x[:rows], or x itself when that is all of it."""
    return x if rows == x.size(0) else x[:rows]


class _Shared(torch.autograd.Function):
    """x -> x (a view); backward: the sum of what the steps recorded (`_Prefix`, `_Mix`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, records: dict) -> torch.Tensor:
        ctx.records, ctx.rows = records, x.size(0)
        ctx.set_materialize_grads(False)  # the steps return no gradient for x: None, not 0
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        total = ctx.records.pop("prefix", None)  # (B, ...), filled by the steps, run first
        mixes = ctx.records.pop("mix", [])  # [(alpha_t (b_t, P), g_t (b_t, E))]
        if mixes:  # recorded last step first; rows b_t <= B
            (alpha, g), steps = mixes[0], len(mixes)
            weights = alpha.new_zeros(ctx.rows, steps, alpha.size(1))  # (B, T, P)
            outer = g.new_zeros(ctx.rows, steps, g.size(1))  # (B, T, E), zeros once ended
            for t, (alpha, g) in enumerate(mixes):
                weights[:alpha.size(0), t], outer[:g.size(0), t] = alpha, g
            mixed = torch.bmm(weights.transpose(1, 2), outer)  # (B, P, E): sum_t alpha_t g_t^T
            total = mixed if total is None else total + mixed
        if total is None:
            return grad, None
        return (total if grad is None else total + grad), None


class _Prefix(torch.autograd.Function):
    """x -> x[:rows] (a view); backward: adds the gradient into rows [:rows] of a buffer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: int, records: dict) -> torch.Tensor:
        ctx.rows, ctx.shape, ctx.records = rows, x.shape, records
        return x[:rows]  # (rows, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if "prefix" not in ctx.records:
            ctx.records["prefix"] = grad.new_zeros(ctx.shape)  # (B, ...), once per backward
        ctx.records["prefix"][:ctx.rows] += grad
        return None, None, None  # x's gradient goes to _Shared


class _Mix(torch.autograd.Function):
    """alpha (b, P), x (B, P, E) -> sum_i alpha_i x[:b, i] (b, E); backward: alpha's
    gradient now, x's recorded as (alpha, g) and made in one batched product (`_Shared`)."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, x: torch.Tensor, records: dict,
                low: torch.Tensor | None = None) -> torch.Tensor:
        device = x.device.type
        ctx.cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.dtype, ctx.records = x.dtype, records  # x's gradient is recorded in x's dtype
        x = x if low is None else low  # `StepInput.low`: the values autocast would make
        ctx.save_for_backward(alpha, x)
        return torch.bmm(alpha.unsqueeze(1), x[:alpha.size(0)]).squeeze(1)  # (b, E)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        alpha, x = ctx.saved_tensors  # (b, P), (B, P, E)
        rows = x[:alpha.size(0)]  # (b, P, E)
        dtype = ctx.cast or rows.dtype  # under autocast, as the forward's product ran
        ctx.records.setdefault("mix", []).append((alpha.to(ctx.dtype), grad.to(ctx.dtype)))
        dalpha = torch.bmm(rows.to(dtype), grad.to(dtype).unsqueeze(2)).squeeze(2)  # (b, P)
        return dalpha.to(alpha.dtype), None, None, None


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs products in on x's device, if that is not x's own (None
    outside autocast)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or not x.is_floating_point():
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if x.dtype == dtype else dtype


class StepInput:
    """`x` (B, ...) read by the steps of one loop through prefixes of its rows (the
    batch sorted longest first, shrinking): `self.prefix(b)` is x[:b], and for regions
    x (B, P, E) `self.mix(alpha)` is the context sum_i alpha_i x[:b, i] (alpha (b, P)).
    Make one per forward pass. x's gradient is made once, after the steps: the prefixes'
    gradients added in place into one buffer, the mixes' in one batched product (autograd
    would zero-fill and add a whole (B, ...) gradient at every step). Without gradient,
    plain slices and products."""

    def __init__(self, x: torch.Tensor) -> None:
        self.tracked = torch.is_grad_enabled() and x.requires_grad
        self.records: dict = {}
        self.x = _Shared.apply(x, self.records) if self.tracked else x  # (B, ...)
        self._source, self._low = x, None  # `low`, made by the first mix that needs it
        self._cast = _autocast_dtype(x) if self.tracked else None

    @property
    def low(self) -> torch.Tensor | None:
        """x (B, ...) in the dtype autocast ran products in when this was made, for the
        mixes (`_Mix`), made once: autocast would cast each step's prefix again, forward
        and backward. The same values, so the same results, bit for bit; a decoder
        training step under CPU bf16 autocast (B 32, lengths 8-20, 512 dims, vocabulary
        300, 2 threads) took 16-17 ms (7 %) less. None without gradient, outside autocast
        or when x is in that dtype already. Readers of prefixes alone never make it."""
        if self._low is None and self._cast is not None:
            self._low = self._source.detach().to(self._cast)
        return self._low

    def _tracking(self) -> bool:
        return self.tracked and torch.is_grad_enabled()

    def prefix(self, rows: int) -> torch.Tensor:
        if self._tracking():
            return _Prefix.apply(self.x, rows, self.records)  # (rows, ...)
        return first_rows(self.x, rows)  # (rows, ...)

    def mix(self, alpha: torch.Tensor) -> torch.Tensor:
        if self._tracking():
            return _Mix.apply(alpha, self.x, self.records, self.low)  # (b, E)
        return torch.bmm(alpha.unsqueeze(1), self.prefix(alpha.size(0))).squeeze(1)  # (b, E)


class RepeatedRows(StepInput):
    """`StepInput` for x (B, ...) standing for every row repeated k times in a row
    (row r < B*k is x[r // k]), then, optionally, one row per image of `extra` (R,)
    (row B*k + j is x[extra[j]]): a beam search's k beams of one image share one copy of
    its features, and the greedy captions that left the beams ride along behind them
    (`decoding._GreedyInBeam`). Decoding only (no gradient). `mix(alpha)` reads x once per
    image for the B*k beam rows, (B, k, P) @ (B, P, E), rather than a (B*k, P, E) copy of
    it at every step; the R extra rows are gathered once, when this object is made.
    `prefix` makes the whole (B*k + R, ...) copy, once, for the readers that need the rows
    themselves (a decoder without attention, hard attention's picks)."""

    def __init__(self, x: torch.Tensor, k: int, extra: torch.Tensor | None = None) -> None:
        self.tracked, self.records = False, {}
        self.x, self.k = x, k  # (B, P, E)
        self.extra = x[extra] if extra is not None and extra.numel() else None  # (R, P, E)
        self.repeated: torch.Tensor | None = None  # (B*k + R, P, E), made by the first `prefix`

    def rows(self) -> int:
        """B*k + R."""
        return self.x.size(0) * self.k + (self.extra.size(0) if self.extra is not None else 0)

    def prefix(self, rows: int) -> torch.Tensor:
        if self.repeated is None:
            self.repeated = self.x.repeat_interleave(self.k, dim=0)  # (B*k, ...)
            if self.extra is not None:
                self.repeated = torch.cat([self.repeated, self.extra])  # (B*k + R, ...)
        return first_rows(self.repeated, rows)  # (rows, ...)

    def mix(self, alpha: torch.Tensor) -> torch.Tensor:
        B, k = self.x.size(0), self.k
        if alpha.size(0) != self.rows():
            raise ValueError(f"RepeatedRows.mix: alpha has {alpha.size(0)} rows, not "
                             f"B*k + R = {self.rows()}")
        context = torch.bmm(alpha[:B * k].view(B, k, -1), self.x).view(B * k, -1)  # (B*k, E)
        if self.extra is None:
            return context
        extra = torch.bmm(alpha[B * k:].unsqueeze(1), self.extra).squeeze(1)  # (R, E)
        return torch.cat([context, extra])  # (B*k + R, E)


class _SplitColumns(torch.autograd.Function):
    """(N, K) -> its columns [:, :at] and [:, at:]; backward: the two gradients side by side
    in one tensor (autograd's slicing would zero-fill a full (N, K) gradient per slice and
    then add the two)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, at: int):
        ctx.at, ctx.shape = at, weight.shape
        ctx.set_materialize_grads(False)
        return weight[:, :at], weight[:, at:]  # (N, at), (N, K - at)

    @staticmethod
    def backward(ctx, left: torch.Tensor | None, right: torch.Tensor | None):
        if left is None and right is None:
            return None, None
        like = left if left is not None else right
        n, k = ctx.shape
        left = left if left is not None else like.new_zeros(n, ctx.at)  # (N, at)
        right = right if right is not None else like.new_zeros(n, k - ctx.at)  # (N, K - at)
        return torch.cat([left, right], dim=1), None  # (N, K)


def split_columns(weight: torch.Tensor, at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight[:, :at] and weight[:, at:], (N, K) -> (N, at), (N, K - at), whose gradients
    are written once into the (N, K) gradient instead of once per part."""
    return _SplitColumns.apply(weight, at)


def lstm_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM update from its pre-activations, in `nn.LSTMCell`'s layout.

    gates (B, 4H) = W_ih x + b_ih + W_hh h + b_hh, four blocks of H for the input gate i,
    the forget gate f, the candidate g and the output gate o (in that order); c (B, H).
    Returns (h, c), each (B, H): c' = sigma(f) c + sigma(i) tanh(g), h' = sigma(o) tanh(c').
    """
    i, f, g, o = gates.chunk(4, dim=1)  # (B, H) each
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, H)
    h = torch.sigmoid(o) * torch.tanh(c)  # (B, H)
    return h, c
