"""Stochastic "hard" attention (Xu et al. 2015, Sec. 4.1), trained with REINFORCE.

Soft attention (`caption_lib.attention`) gives the decoder the expected context
sum_i alpha_ti a_i. Hard attention looks at ONE region per word: a location s_t is drawn
from the attention distribution and that region's feature is the context,

    s_t ~ Multinoulli(alpha_t),      z_t = a_{s_t}

The likelihood of a caption would need a sum over all P^T location sequences, so the model
maximises a variational lower bound on the log-likelihood instead (Sec. 4.1),

    L_s = sum_s p(s | a) log p(y | s, a)  <=  log p(y | a),

whose gradient is an expectation over s; one sampled sequence s~ per caption estimates
it (eqs. 11-12, with the baseline and the entropy term of the learning rule after them):

    grad L_s ~ grad log p(y | s~, a)                                 likelihood term
             + lambda_r (log p(y | s~, a) - b) grad log p(s~ | a)     REINFORCE term
             + lambda_e grad H[s~]                                   entropy term

No gradient flows through the drawn index; the REINFORCE (score-function) term carries
it to the attention instead, raising the probability of the locations that made the
caption likely. Its variance is high. The baseline b lowers it without changing its
mean, because E_s[grad log p(s | a)] = 0 for any b that does not depend on the sample:
b is the paper's moving average b_k = 0.9 b_{k-1} + 0.1 log p(y | s~_k, a) (the mean
over the batch's sampled captions), kept in the decoder's state as a buffer (checkpoints
and resumes carry it), and batch k uses b_{k-1}, the value from before its own samples
(data-parallel: the mean is taken over the global batch, every process's sampled
captions, so all processes hold the same b).
H[s~] = sum_t H(alpha_t) along the sampled path, each step's multinoulli entropy in
closed form (-sum_i alpha_ti log alpha_ti). And "with probability 0.5 ... the sampled
attention location s~ is set to its expected value alpha" (Sec. 4.1): such a caption,
drawn here per caption, trains exactly like soft attention (likelihood term only).

Like the cross-entropy of `caption_loss`, every term is summed over the batch's captions
and divided by its number of words, so lambda_r = 1 is the unbiased gradient of L_s per
word (the doubly stochastic regulariser is added as for soft attention).

Test time: the paper does not say which context hard attention decodes with. The
authors' code (kelvinxu/arctic-captions, `generate_caps.py`: `sampling=False` unless
asked) uses the expected context, as soft attention does: `test_context="expected"`,
the default. "argmax" (the most likely region) and "sample" (a drawn one) are the
alternatives; the Hard attention chapter measures all three.

Shapes: B captions, P regions (49), E encoder dim, H decoder dim, V vocabulary size,
L caption length incl. <start>/<end>, T = L - 1 decoding steps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from caption_lib import distributed
from caption_lib.decoder import DecoderWithAttention, caption_loss, loss_terms, step_mask
from caption_lib.recurrent import StepInput

TEST_CONTEXTS = ("expected", "argmax", "sample")
_TINY = 1e-30  # log(0) guard: alpha of a drawn region is > 0, but may underflow


class HardPass(NamedTuple):
    """What the sampled teacher-forced pass returns (in the caller's order)."""

    logits: torch.Tensor  # (B, T, V)
    alphas: torch.Tensor  # (B, T, P) attention distributions, 0 at padded steps
    locations: torch.Tensor  # (B, T) int64 drawn s_t, -1 at padded steps
    log_p_s: torch.Tensor  # (B,) log p(s~ | a) = sum_t log alpha_{t, s_t}; 0 if not sampled
    entropy: torch.Tensor  # (B,) H[s~] = sum_t H(alpha_t) along the path; 0 if not sampled
    sampled: torch.Tensor  # (B,) bool: True = hard context, False = expected context


def entropy(alpha: torch.Tensor) -> torch.Tensor:
    """Closed-form multinoulli entropy -sum_i alpha_i log alpha_i of (..., P) -> (...).

    Masked regions (alpha exactly 0) count 0 and pass a zero gradient (not NaN)."""
    positive = alpha > 0
    safe = torch.where(positive, alpha, torch.ones_like(alpha))  # log(1) = 0 where masked
    return -(alpha * torch.log(safe)).sum(dim=-1)  # (...)


class HardAttentionDecoder(DecoderWithAttention):
    """`DecoderWithAttention` whose context is one region drawn from its attention.

    The same `Attention` and LSTM update (`read`, `write`) as soft attention; only the choice of the
    context differs. `forward(..., sample=True)` is the training pass (`HardPass`);
    plain `forward` and `step` use `test_context` in eval mode ("expected" in train mode).

    Args (besides `DecoderWithAttention`'s):
        expected_prob: chance that a caption trains with the expected context (paper: 0.5).
        test_context: "expected", "argmax" or "sample": the context used in eval mode.
    """

    def __init__(self, *args, expected_prob: float = 0.5, test_context: str = "expected",
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.attention is None:
            raise ValueError("hard attention needs use_attention=True")
        self.expected_prob = expected_prob
        self.test_context = test_context
        # b: moving average of log p(y | s~, a), part of the state so that resume is exact
        self.register_buffer("baseline", torch.zeros(()))

    def _attend(self, regions: StepInput, query: torch.Tensor | None,
                keys: StepInput | None, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        context, alpha = super()._attend(regions, query, keys, rows)  # (B, E), (B, P)
        if self.training or self.test_context == "expected":
            return context, alpha
        features = regions.prefix(rows)  # (B, P, E)
        if self.test_context == "argmax":
            where = alpha.argmax(dim=1)  # (B,)
        else:  # "sample"
            where = torch.multinomial(alpha.float(), 1).squeeze(1)  # (B,)
        return pick(features, where), alpha  # (B, E), (B, P)

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                sample: bool = False, locations: torch.Tensor | None = None,
                region_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None):
        """Teacher-forced pass. `sample=False`: like `DecoderWithAttention.forward`
        (logits, alphas). `sample=True`: the hard pass, a `HardPass`.

        Args (sample=True):
            locations: (B, T) int64 to force s_t instead of drawing it (every caption then
                uses them; for exact enumeration in tests and the chapter).
            region_mask: (B, P) bool, True for real regions; masked ones are never drawn.
            generator: the random generator for the draws (default: torch's global one).
        """
        if not sample:
            return super().forward(features, captions, lengths)
        return self._sampled(features, captions, lengths, locations, region_mask, generator)

    def _sampled(self, features, captions, lengths, locations, region_mask, generator):
        B, P, _ = features.shape
        steps = captions.size(1) - 1  # T
        lengths = lengths.to(features.device)  # (B,)
        order = torch.argsort(lengths, descending=True, stable=True)  # (B,) as in `forward`
        features, captions = features[order], captions[order]  # (B, P, E), (B, L)
        mask = region_mask[order] if region_mask is not None else None  # (B, P)
        forced = locations[order] if locations is not None else None  # (B, T)
        running = step_mask(lengths[order], steps).sum(dim=0).tolist()  # T ints
        if forced is None:  # per caption: hard (True) or the expected context (False)
            draw = torch.rand(B, generator=generator, device=generator.device
                              if generator is not None else features.device)  # (B,)
            sampled = (draw >= self.expected_prob).to(features.device)  # (B,)
        else:
            sampled = torch.ones(B, dtype=torch.bool, device=features.device)  # (B,)
        loop = self.prepare()
        embedded = self.embedding(captions[:, :steps])  # (B, T, D)
        word_gates = self.input_gates(loop, embedded).unbind(1)  # T x (B, 4H)
        h, c = self.init_state(features)  # (B, H), (B, H)
        projected = self.project(features)  # (B, P, A)
        hidden = features.new_zeros(B, steps, self.decoder_dim)  # (B, T, H)
        zs = features.new_zeros(B, steps, self.encoder_dim if self.deep_output else 0)  # (B, T, E)
        alphas = features.new_zeros(B, steps, P)  # (B, T, P)
        log_alpha = features.new_zeros(B, steps)  # (B, T) log alpha_{t, s_t}
        entropies = features.new_zeros(B, steps)  # (B, T) H(alpha_t)
        where = torch.full((B, steps), -1, dtype=torch.long, device=features.device)  # (B, T)
        for t, b in enumerate(running):
            if b == 0:
                break
            query, gate, from_h = self.read(loop, h[:b])  # (b, A), (b, E), (b, 4H)
            context, alpha = self.attention.weigh(features[:b], query, projected[:b],
                                                  mask=None if mask is None else mask[:b])
            if forced is None:
                s = torch.multinomial(alpha.detach().float(), 1, generator=generator)
                s = s.squeeze(1).to(features.device)  # (b,)
            else:
                s = forced[:b, t]  # (b,)
            context = torch.where(sampled[:b, None], pick(features[:b], s), context)  # (b, E)
            z = gate * context  # (b, E)
            h, c = self.write(loop, word_gates[t][:b], from_h, z, c[:b])  # (b, H) x2
            hidden[:b, t], alphas[:b, t], where[:b, t] = h, alpha, s
            if self.deep_output:
                zs[:b, t] = z
            chosen = alpha.gather(1, s.unsqueeze(1)).squeeze(1)  # (b,) alpha_{t, s_t}
            log_alpha[:b, t] = torch.log(chosen.clamp_min(_TINY))
            entropies[:b, t] = entropy(alpha)  # (b,)
        keep = sampled.to(features.dtype)  # (B,) expected-context captions: no s~
        restore = torch.argsort(order)  # (B,) back to the caller's order
        logits = self.output(embedded, hidden, zs)  # (B, T, V)
        return HardPass(logits[restore], alphas[restore], where[restore],
                        (log_alpha.sum(dim=1) * keep)[restore],
                        (entropies.sum(dim=1) * keep)[restore], sampled[restore])


def pick(features: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """a_{s}: the feature of region `where[b]` of each image, (B, P, E), (B,) -> (B, E)."""
    rows = torch.arange(features.size(0), device=features.device)  # (B,)
    return features[rows, where.to(features.device)]  # (B, E)


def caption_log_likelihood(logits: torch.Tensor, captions: torch.Tensor,
                           lengths: torch.Tensor) -> torch.Tensor:
    """log p(y | s~, a) per caption: the sum over its real words, (B, T, V) -> (B,)."""
    steps = logits.size(1)  # T
    targets = captions[:, 1:steps + 1].to(logits.device)  # (B, T)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = logp.gather(2, targets.unsqueeze(2)).squeeze(2)  # (B, T)
    real = step_mask(lengths, steps, logits.device)  # (B, T)
    return (picked * real).sum(dim=1)  # (B,)


def reinforce_loss(out: HardPass, captions: torch.Tensor, lengths: torch.Tensor,
                   baseline: float | torch.Tensor, lambda_r: float = 1.0,
                   lambda_e: float = 0.0, alpha_c: float = 0.0,
                   weights: tuple[float, float] | None = None,
                   ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """The surrogate loss whose gradient is minus the estimate of grad L_s (module docstring).

    loss = xent + alpha_c * reg (as `caption_loss`)
           - [lambda_r (R_n - b) log p(s~_n | a) + lambda_e H[s~_n]] summed over the sampled
             captions n and divided by the batch's number of words,
    with R_n = log p(y_n | s~_n, a) a constant (detached) and b the baseline. `weights`
    (per-word terms, per-caption terms) scale the two kinds of term as in `Captioner.loss`
    (data-parallel shares; None: 1, 1).

    Returns the loss, its parts (floats: xent, reg, tokens, reward, baseline, entropy,
    sampled) and the rewards R (B,) (detached) for the baseline update.
    """
    xent, reg, tokens = loss_terms(out.logits.float(), captions, lengths, out.alphas.float())
    reward = caption_log_likelihood(out.logits, captions, lengths).detach()  # (B,)
    b = float(baseline)
    keep = out.sampled.to(reward.dtype)  # (B,)
    score = (lambda_r * (reward - b) * keep * out.log_p_s).sum()  # REINFORCE surrogate
    bonus = lambda_e * (keep * out.entropy).sum()  # entropy term
    per_word = xent - (score + bonus) / max(tokens, 1.0)  # scalar
    per_word_weight, per_caption_weight = weights if weights is not None else (1.0, 1.0)
    loss = per_word_weight * per_word + alpha_c * per_caption_weight * reg
    n = float(keep.sum())
    parts = {"xent": float(xent.detach()), "reg": float(reg.detach()), "tokens": tokens,
             "reward": float((reward * keep).sum()) / n if n else float("nan"), "baseline": b,
             "entropy": float((out.entropy.detach() * keep).sum()) / n if n else 0.0,
             "sampled": n}
    return loss, parts, reward


@torch.no_grad()
def update_baseline(baseline: torch.Tensor, reward: torch.Tensor, sampled: torch.Tensor,
                    decay: float = 0.9) -> None:
    """b <- decay * b + (1 - decay) * mean reward of the sampled captions (in place).

    Data-parallel: the mean over every process's sampled captions (one small all-reduce),
    so the processes keep one b."""
    total, count = distributed.all_reduce_sum([float(reward[sampled].sum()),
                                               float(sampled.sum())])
    if count > 0:
        baseline.mul_(decay).add_((1.0 - decay) * total / count)


def hard_attention_loss(decoder: HardAttentionDecoder, features: torch.Tensor,
                        captions: torch.Tensor, lengths: torch.Tensor, *,
                        lambda_r: float, lambda_e: float, alpha_c: float,
                        baseline_decay: float, weights: tuple[float, float] | None = None,
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch's training loss for hard attention; in train mode, updates the baseline.

    `weights`: as in `Captioner.loss` (data-parallel shares of the global batch). In eval
    mode: the plain loss of the test-time context, nothing updated.
    """
    if not decoder.training:
        logits, alphas = decoder(features, captions, lengths)  # (B, T, V), (B, T, P)
        return caption_loss(logits.float(), captions, lengths, alphas.float(), alpha_c=alpha_c,
                            weights=weights)
    out = decoder(features, captions, lengths, sample=True)  # HardPass
    loss, parts, reward = reinforce_loss(out, captions, lengths, decoder.baseline,
                                         lambda_r, lambda_e, alpha_c, weights)
    update_baseline(decoder.baseline, reward, out.sampled, baseline_decay)  # b_k, after use
    return loss, parts


class GradientStats(NamedTuple):
    """Moments of repeated gradient estimates of one batch (flattened parameters)."""

    mean: torch.Tensor  # (N,) mean over the samples
    stderr: torch.Tensor  # (N,) standard error of that mean
    variance: float  # sum over coordinates of the variance of one estimate
    samples: int


def gradient_stats(decoder: HardAttentionDecoder, features: torch.Tensor,
                   captions: torch.Tensor, lengths: torch.Tensor, samples: int,
                   baseline: float | None = None, lambda_r: float = 1.0,
                   lambda_e: float = 0.0, decay: float | None = None,
                   generator: torch.Generator | None = None) -> GradientStats:
    """Draw `samples` REINFORCE gradient estimates of one batch, every caption sampled.

    `baseline`: a fixed b (None: the decoder's moving average, updated after every
    estimate with `decay` when given, else left as it is). Dropout is off (eval mode)
    so that only the location draws vary; the decoder's state is restored afterwards.
    """
    params = [p for p in decoder.parameters() if p.requires_grad]
    was_training, prob = decoder.training, decoder.expected_prob
    saved_baseline = decoder.baseline.clone()
    decoder.eval()
    decoder.expected_prob = 0.0  # the estimator itself, no expected-context captions
    total = square = None
    try:
        for _ in range(samples):
            out = decoder(features, captions, lengths, sample=True, generator=generator)
            b = decoder.baseline if baseline is None else baseline
            loss, _, reward = reinforce_loss(out, captions, lengths, b, lambda_r, lambda_e)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                              for g, p in zip(grads, params)]).double()  # (N,)
            total = flat if total is None else total + flat
            square = flat ** 2 if square is None else square + flat ** 2
            if baseline is None and decay is not None:
                update_baseline(decoder.baseline, reward, out.sampled, decay)
    finally:
        decoder.train(was_training)
        decoder.expected_prob = prob
        decoder.baseline.copy_(saved_baseline)
    mean = total / samples  # (N,)
    var = (square / samples - mean ** 2).clamp_min(0) * samples / max(samples - 1, 1)  # (N,)
    return GradientStats(mean.float(), (var / samples).sqrt().float(), float(var.sum()),
                         samples)


__all__ = [
    "TEST_CONTEXTS",
    "GradientStats",
    "HardAttentionDecoder",
    "HardPass",
    "caption_log_likelihood",
    "entropy",
    "gradient_stats",
    "hard_attention_loss",
    "pick",
    "reinforce_loss",
    "update_baseline",
]
