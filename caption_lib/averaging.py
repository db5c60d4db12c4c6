"""Weight averaging: an exponential moving average (EMA) of the trained weights.

Not in Xu et al. 2015; Polyak and Juditsky (1992) averaged the iterates of stochastic
gradient descent, and the exponential form is common in training today. After every
optimiser step each trained weight w has an average

    S_t = d * S_(t-1) + (1 - d) * w_t,   S_0 = 0,   w_avg = S_t / (1 - d^t)

(d = `decay`, e.g. 0.99: about the last 100 steps). Dividing by 1 - d^t, the sum of the
shares given to the steps so far, is the bias correction Adam uses for its moments: the
average is a weighted mean of the weights after steps 1..t only, however few steps there
were, not pulled towards zero or the initial weights early in a run. It is kept as w_avg
itself: w_avg <- k_t w_avg + (1 - k_t) w_t, k_t = d (1 - d^(t-1)) / (1 - d^t) (k_1 = 0).

Training moves w; validation, `best.pt` and the model `last.pt` holds use w_avg
(`TrainConfig.ema_decay`). Why: with few images and a
small batch, the weights after any one step sit somewhere in a noisy neighbourhood, and
greedy decoding is sensitive to that (chapter 5: validation F1 that swings by 0.07 from
one epoch to the next while the loss falls); their average sits nearer its middle
(`benchmarks/results/recipe_ema__xeon-amx.json`).

Shapes: every average has its weight's shape; `state_dict()` maps parameter names (as in
`model.named_parameters()`) to them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from caption_lib.errors import CaptionLibError


class WeightAverage:
    """The averages of `model`'s trainable parameters (`requires_grad` when built).

    `update()` after every optimiser step; `applied()` puts the averages into the model
    for a `with` block (validation, checkpoints) and the trained weights back after it."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise CaptionLibError(f"weight average decay {decay!r}: must be in (0, 1)")
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.averages = [p.detach().clone() for p in self.params]
        self.steps = 0  # updates so far (t above)
        self.held: list[torch.Tensor] | None = None  # the trained weights while applied

    @torch.no_grad()
    def update(self) -> None:
        """w_avg <- k_t w_avg + (1 - k_t) w for every weight (see the module docstring). A
        multiply and an add: on this book's CPU they took 10 ms over 15 million weights,
        `torch.lerp_` about 70."""
        self.steps += 1
        d, t = self.decay, self.steps
        keep = d * (1.0 - d ** (t - 1)) / (1.0 - d ** t)  # k_t; 0 at the first step
        moving = [(a, p.detach()) for a, p in zip(self.averages, self.params) if p.requires_grad]
        if moving:  # a weight frozen since (`settle`) keeps its average as it is
            averages, weights = zip(*moving)
            torch._foreach_mul_(list(averages), keep)
            torch._foreach_add_(list(averages), list(weights), alpha=1.0 - keep)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside: the model's weights are the averages. After: the trained ones again."""
        with torch.no_grad():
            self.held = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.averages):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, h in zip(self.params, self.held):
                    p.copy_(h)
            self.held = None

    def trained(self) -> dict[str, torch.Tensor]:
        """The trained (not averaged) weights by name: what training goes on from."""
        values = self.held if self.held is not None else [p.detach() for p in self.params]
        return {n: v.clone() for n, v in zip(self.names, values)}

    def resume(self, trained: dict[str, torch.Tensor], steps: int) -> None:
        """After loading a checkpoint whose model holds the averages (this object was built
        from it): put `trained` (from `trained()`) back into the model's weights; `steps`:
        the updates the averages have had."""
        self.steps = int(steps)
        missing = sorted(set(self.names) - set(trained))
        if missing:
            raise CaptionLibError(f"checkpoint: no trained weights for {missing[:3]} "
                                  f"({len(missing)} missing) to resume the weight average")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(trained[n])

    def settle(self, module: nn.Module) -> None:
        """`module`'s weights stop training (`requires_grad` off): they become their
        averages for good (later updates skip weights that do not require gradients)."""
        ids = {id(p) for p in module.parameters()}
        with torch.no_grad():
            for p, a in zip(self.params, self.averages):
                if id(p) in ids:
                    p.copy_(a)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.averages))
