"""The caption decoder of "Show, Attend and Tell": an LSTM that attends while it writes.

Xu et al. 2015, Sec. 3.1.2. At step t the decoder reads the previous word y_{t-1}, looks
at the image through soft attention (`caption_lib.attention`), and updates an LSTM:

    alpha_t, z_t = f_att(a, h_{t-1})                   (where to look, and what it sees)
    beta_t       = sigmoid(f_beta(h_{t-1}))            (gate: how much of the image to use)
    h_t, c_t     = LSTM([E y_{t-1}; beta_t * z_t], (h_{t-1}, c_{t-1}))
    p(y_t | ...) = softmax(L_o dropout(tanh(E y_{t-1} + L_h h_t + L_z z_t)))   (deep output)
               or softmax(W_o dropout(h_t))        (deep_output=False)

The deep output is the paper's (Sec. 3.1.2, Eq. 7): the embedded previous word, the state
and the gated context z_t = beta_t * sum_i alpha_ti a_i are combined before the vocabulary
layer L_o, so the word can be read off the region the decoder looks at now. Eq. 7 writes no
non-linearity; like the readout of the attention decoders of that time (dl4mt / Nematus:
tanh of the three terms, then dropout), a tanh and dropout come before L_o. With
`deep_output=False` the output is one linear layer W_o on the dropped-out state, as most
re-implementations do (the previous word and the context then reach the output only
through h_t); `CaptionerConfig.deep_output` chooses, the book's recipes use the deep output.

The initial state comes from the mean region feature through two linear layers
(h_0 = f_init,h(mean_i a_i), c_0 = f_init,c(mean_i a_i)). Training maximises the
likelihood of the reference words (teacher forcing: y_{t-1} is the reference word) plus
the doubly stochastic regulariser lambda * sum_i (1 - sum_t alpha_ti)^2 (`caption_loss`).

Variable-length captions: `forward` sorts the batch by length (internally; outputs come
back in the caller's order) and at step t runs only the captions still going, a prefix of
the sorted batch ("shrinking"); padded steps are also masked out of the loss. The simpler
alternative, running every step for the whole batch and relying on the loss mask alone,
gives the same numbers; shrinking was measurably faster on the book's benchmark (about 8%
with lengths 10-20, more when lengths vary more; `benchmarks/bench_decoder.py`).

Speed: W_a a is projected once per sequence, and the output layer (its last matrix, to
the V words, is the biggest) is applied to all steps at once after the loop. Inside the loop
(`prepare`): the three products of h_{t-1} (attention query, gate, W_hh h) are one
product; the word's share of the LSTM input is computed for all steps at once; and the
per-step weights get their gradients from one product per loop (`caption_lib.recurrent`);
when the features need a gradient (a fine-tuned encoder), the steps' reads of them are
summed once, after the loop (`recurrent.StepInput`).
The parameters are still those of `nn.Linear`/`nn.LSTMCell` modules: checkpoints and the
maths are unchanged (tests/test_recurrent.py compares values and gradients with the plain
per-step formulation).

Shapes: B batch, P regions (49), E encoder dim (2048), D word-embedding dim, H decoder
dim, A attention dim, L caption length incl. <start>/<end>, T = L - 1 decoding steps,
V vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from caption_lib.attention import Attention
from caption_lib.recurrent import StepInput, StepWeight, first_rows, lstm_cell, split_columns

State = tuple[torch.Tensor, torch.Tensor]


def step_mask(lengths: torch.Tensor, steps: int,
              device: torch.device | str | None = None) -> torch.Tensor:
    """(B, T) bool on `device` (default: lengths'), True where step t predicts a real token
    (t < length - 1)."""
    lengths = lengths.to(device if device is not None else lengths.device)  # (B,)
    t = torch.arange(steps, device=lengths.device)  # (T,)
    return t.unsqueeze(0) < (lengths - 1).unsqueeze(1)  # (B, T)


def stack_steps(steps: list[torch.Tensor], like: torch.Tensor, batch: int, total: int,
                width: int) -> torch.Tensor:
    """Per-step outputs of the running prefix, [(b_t, X)] (b_t non-increasing, X = width),
    as one (batch, total, X) tensor (dtype and device of `like`) with zeros where a
    caption had ended and after the last step. One stack instead of a write into a
    preallocated tensor per step, whose backward copies the whole tensor at every step."""
    padded = [F.pad(x, (0, 0, 0, batch - x.size(0))) for x in steps]  # (batch, X) each
    padded += [like.new_zeros(batch, width)] * (total - len(padded))  # steps never run
    return torch.stack(padded, dim=1) if padded else like.new_zeros(batch, 0, width)


class DecoderWithAttention(nn.Module):
    """LSTM decoder with soft attention (or, `use_attention=False`, the mean feature).

    Args:
        vocab_size: V.
        encoder_dim: E, size of a region feature.
        embed_dim: D, size of a word embedding.
        decoder_dim: H, size of the LSTM state.
        attention_dim: A, size of the attention space.
        dropout: dropout probability before the output layer (on h_t, or on the deep output).
        use_attention: False gives the "Show and Tell"-like baseline used for comparison:
            the context is the mean region feature at every step and alpha is uniform 1/P.
        deep_output: True: the paper's deep output layer (Eq. 7; `out_h` L_h (H -> D),
            `out_z` L_z (E -> D), `fc` L_o (D -> V)); False: `fc` W_o (H -> V) on h_t.
    """

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int = 2048,
        embed_dim: int = 512,
        decoder_dim: int = 512,
        attention_dim: int = 512,
        dropout: float = 0.5,
        use_attention: bool = True,
        deep_output: bool = False,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.encoder_dim = encoder_dim
        self.decoder_dim = decoder_dim
        self.use_attention = use_attention
        self.attention = (Attention(encoder_dim, decoder_dim, attention_dim)
                          if use_attention else None)
        self.embedding = nn.Embedding(vocab_size, embed_dim)  # E y (the paper's E)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)  # f_init,h
        self.init_c = nn.Linear(encoder_dim, decoder_dim)  # f_init,c
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)  # gate beta
        self.lstm = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim)
        self.dropout = nn.Dropout(dropout)
        self.deep_output = deep_output
        if deep_output:
            self.out_h = nn.Linear(decoder_dim, embed_dim)  # L_h
            self.out_z = nn.Linear(encoder_dim, embed_dim)  # L_z
        self.fc = nn.Linear(embed_dim if deep_output else decoder_dim, vocab_size)  # L_o or W_o
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-0.1, 0.1) embedding and output weights, zero output bias."""
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    # -- pieces shared by `forward` (training) and `step` (decoding) --------------------

    def init_state(self, features: torch.Tensor) -> State:
        """(h_0, c_0), each (B, H), from the mean of the (B, P, E) features."""
        mean = features.mean(dim=1)  # (B, E)
        return self.init_h(mean), self.init_c(mean)  # (B, H), (B, H)

    def project(self, features: torch.Tensor) -> torch.Tensor | None:
        """W_a a for the attention, (B, P, A), once per sequence (None without attention)."""
        return self.attention.project(features) if self.attention is not None else None

    def prepare(self) -> LoopWeights:
        """The weights arranged for one pass of the loop (make one per sequence).

        h_{t-1} enters three products: the attention's query W_h h, the gate f_beta(h) and
        the LSTM's W_hh h. They are one product with the three matrices stacked
        (A + E + 4H rows). The LSTM's input weight W_ih is split by its columns into the
        word part (`input_gates`, applied to all steps at once) and the context part,
        applied at each step. Both per-step weights are `StepWeight`s: their gradients
        are one product over all steps (`caption_lib.recurrent`). The parameters are the
        modules' own (`f_beta`, `lstm`, ...), so checkpoints are unchanged.
        """
        word, context = split_columns(self.lstm.weight_ih, self.embedding.embedding_dim)
        parts = [self.f_beta.weight, self.lstm.weight_hh]  # (E, H), (4H, H)
        biases = [self.f_beta.bias, torch.zeros_like(self.lstm.bias_hh)]  # b_hh: in input_gates
        if self.attention is not None:
            parts.insert(0, self.attention.decoder_att.weight)  # (A, H)
            biases.insert(0, self.attention.decoder_att.bias)
        return LoopWeights(from_h=StepWeight(torch.cat(parts)),  # (A + E + 4H, H)
                           h_bias=torch.cat(biases),  # (A + E + 4H,)
                           word=word,  # (4H, D)
                           from_context=StepWeight(context),  # (4H, E)
                           query_dim=parts[0].size(0) if self.attention is not None else 0)

    def input_gates(self, loop: LoopWeights, embedded: torch.Tensor) -> torch.Tensor:
        """The word's share of the LSTM pre-activations plus both LSTM biases:
        (..., D) -> (..., 4H). Applied to all steps of a caption in one product."""
        bias = self.lstm.bias_ih + self.lstm.bias_hh  # (4H,)
        return F.linear(embedded, loop.word, bias)  # (..., 4H)

    def read(self, loop: LoopWeights, h: torch.Tensor
             ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Everything h_{t-1} (b, H) feeds, in one product: the attention query W_h h
        (b, A; None without attention), the gate beta_t (b, E) and W_hh h (b, 4H)."""
        out = loop.from_h(h) + loop.h_bias  # (b, A + E + 4H)
        a, e = loop.query_dim, self.encoder_dim
        # one split, whose backward writes the three gradients side by side (three slices
        # would each zero-fill a (b, A + E + 4H) gradient)
        query, gate, from_h = out.split([a, e, out.size(1) - a - e], dim=1)  # (b, A), (b, E), (b, 4H)
        return (query if a else None), torch.sigmoid(gate), from_h

    def write(self, loop: LoopWeights, word_gates: torch.Tensor, from_h: torch.Tensor,
              z: torch.Tensor, c: torch.Tensor) -> State:
        """The LSTM update from the word's pre-activations (b, 4H, `input_gates`), W_hh h
        (from `read`), the gated context z_t = beta_t * context (b, E) and the cell
        c_{t-1} (b, H).

        Soft attention's context is the expected one, sum_i alpha_i a_i; hard attention
        (`caption_lib.hard_attention`) passes one sampled region a_{s_t}.
        """
        gates = word_gates + from_h + loop.from_context(z)  # (b, 4H)
        return lstm_cell(gates, c)  # (b, H), (b, H)

    def output(self, embedded: torch.Tensor, hidden: torch.Tensor, z: torch.Tensor
               ) -> torch.Tensor:
        """Next-word logits (..., V) from E y_{t-1} (..., D), h_t (..., H) and the gated
        context z_t (..., E): the deep output L_o dropout(tanh(E y + L_h h + L_z z)), or
        W_o dropout(h) (`deep_output=False`, which reads h only)."""
        if not self.deep_output:
            return self.fc(self.dropout(hidden))  # (..., V)
        deep = torch.tanh(embedded + self.out_h(hidden) + self.out_z(z))  # (..., D)
        return self.fc(self.dropout(deep))  # (..., V)

    def _attend(self, regions: StepInput, query: torch.Tensor | None,
                keys: StepInput | None, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Context z_t (b, E) and alpha (b, P) for the first `rows` of the batch."""
        if self.attention is None:
            features = regions.prefix(rows)  # (b, P, E)
            alpha = features.new_full(features.shape[:2], 1.0 / features.size(1))  # (b, P)
            return features.mean(dim=1), alpha  # (b, E), (b, P)
        alpha = self.attention.weights(query, keys.prefix(rows))  # (b, P)
        return regions.mix(alpha), alpha  # (b, E), (b, P)

    def _cell(self, loop: LoopWeights, word_gates: torch.Tensor, state: State,
              regions: StepInput, keys: StepInput | None
              ) -> tuple[State, torch.Tensor, torch.Tensor]:
        """One step of the loop for the b = len(state[0]) first captions: (h, c), alpha
        (b, P) and the gated context z_t (b, E) from the word's pre-activations (b, 4H);
        `regions`, `keys`: the features (B, P, E) and their projection (B, P, A) of the
        whole (sorted) batch."""
        query, gate, from_h = self.read(loop, state[0])  # (b, A), (b, E), (b, 4H)
        context, alpha = self._attend(regions, query, keys, state[0].size(0))  # (b, E), (b, P)
        z = gate * context  # (b, E)
        return self.write(loop, word_gates, from_h, z, state[1]), alpha, z

    # -- training: teacher forcing over the whole caption -------------------------------

    def forward(self, features: torch.Tensor, captions: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over padded captions.

        Args:
            features: (B, P, E) region features.
            captions: (B, L) int64 token ids, <start> ... <end> then padding.
            lengths: (B,) int64, tokens per caption incl. <start>/<end> (<= L).

        Returns:
            logits (B, L-1, V): step t predicts captions[:, t+1] from captions[:, :t+1];
            alphas (B, L-1, P): attention weights, 0 at padded steps. Padded steps are not
            computed: their logits are those of a zero state; `caption_loss` leaves them out.
        """
        if captions.dim() != 2 or features.dim() != 3 or features.size(0) != captions.size(0):
            raise ValueError(f"expected features (B, P, E) and captions (B, L), got "
                             f"{tuple(features.shape)} and {tuple(captions.shape)}")
        B, P, _ = features.shape
        steps = captions.size(1) - 1  # T
        lengths = lengths.to(features.device)  # (B,)
        # longest first, so that the captions still running at step t are the first running[t]
        order = torch.argsort(lengths, descending=True, stable=True)  # (B,)
        # index_select, not features[order]: its backward is an index_add, about twice as
        # fast on CPU as indexing's accumulating scatter of the (B, P, E) gradient
        features = features.index_select(0, order)  # (B, P, E)
        captions = captions[order]  # (B, L)
        running = step_mask(lengths[order], steps).sum(dim=0).tolist()  # T ints
        loop = self.prepare()
        # unbound once: indexing word_gates[:, t] at each step would cost a backward that
        # writes a zero-filled (B, T, 4H) tensor per step
        embedded = self.embedding(captions[:, :steps])  # (B, T, D)
        word_gates = self.input_gates(loop, embedded).unbind(1)
        h, c = self.init_state(features)  # (B, H), (B, H)
        projected = self.project(features)  # (B, P, A) or None
        # read through prefixes of the sorted batch; their gradients are made once, after
        # the loop (a slice's backward would zero-fill the whole (B, P, E) at every step)
        regions = StepInput(features)  # (B, P, E)
        keys = StepInput(projected) if projected is not None else None  # (B, P, A)
        hiddens, alphas, zs = [], [], []  # per step (b, H), (b, P), (b, E)
        for t, b in enumerate(running):
            if b == 0:
                break
            (h, c), alpha, z = self._cell(loop, first_rows(word_gates[t], b), (h[:b], c[:b]),
                                          regions, keys)
            hiddens.append(h)
            alphas.append(alpha)
            zs.append(z)
        restore = torch.argsort(order)  # (B,) back to the caller's order
        hidden = stack_steps(hiddens, features, B, steps, self.decoder_dim
                             ).index_select(0, restore)  # (B, T, H)
        alphas = stack_steps(alphas, features, B, steps, P).index_select(0, restore)  # (B, T, P)
        if self.deep_output:  # the word and the context reach the output too
            embedded = embedded.index_select(0, restore)  # (B, T, D)
            zs = stack_steps(zs, features, B, steps, self.encoder_dim
                             ).index_select(0, restore)  # (B, T, E)
        logits = self.output(embedded, hidden, zs)  # (B, T, V), all steps in one matmul
        return logits, alphas

    # -- decoding: one word at a time ---------------------------------------------------

    def step(self, tokens: torch.Tensor, state: State, features: torch.Tensor,
             projected: torch.Tensor | None = None, loop: LoopWeights | None = None,
             ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One decoding step: previous words `tokens` (B,) -> next-word logits.

        Args:
            tokens: (B,) int64 previous words (<start> at the first step).
            state: (h, c), each (B, H): `init_state(features)` at the first step.
            features: (B, P, E), or a `StepInput` over them (a beam search passes
                `recurrent.RepeatedRows`: k beams per image, one copy of its features).
            projected: `project(features)`, computed once per sequence (None: recomputed).
            loop: `prepare()`, made once per search (None: made here, at every step).

        Returns:
            logits (B, V), the new state (h, c), alpha (B, P). In eval mode a loop of `step`
            over a reference caption gives the same logits as `forward`.
        """
        regions = features if isinstance(features, StepInput) else StepInput(features)
        if projected is None:
            projected = self.project(regions.prefix(tokens.size(0)))  # (B, P, A) or None
        loop = loop if loop is not None else self.prepare()
        embedded = self.embedding(tokens)  # (B, D)
        word_gates = self.input_gates(loop, embedded)  # (B, 4H)
        keys = StepInput(projected) if projected is not None else None  # (B, P, A)
        state, alpha, z = self._cell(loop, word_gates, state, regions, keys)
        return self.output(embedded, state[0], z), state, alpha  # (B, V), ...


@dataclass
class LoopWeights:
    """The decoder's weights arranged for one pass of its loop (`prepare`)."""

    from_h: StepWeight  # h_{t-1} -> [W_h h; f_beta h; W_hh h], (A + E + 4H, H)
    h_bias: torch.Tensor  # (A + E + 4H,) the biases of those three (W_hh's: 0, see input_gates)
    word: torch.Tensor  # (4H, D) the word's columns of W_ih (`input_gates`)
    from_context: StepWeight  # beta_t * z_t -> its share of the LSTM pre-activations, (4H, E)
    query_dim: int  # A (0 without attention)


def loss_terms(logits: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor | None,
               alphas: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The two terms of the paper's loss, each a mean, and the number of real tokens.

    Returns (xent, reg, tokens): the cross-entropy averaged over the real tokens, the
    regulariser sum_i (1 - sum_{t real} alpha_ti)^2 averaged over the captions, both
    scalars with gradient; `tokens` a float. Arguments as for `caption_loss`.
    """
    steps = logits.size(1)  # T
    targets = captions[:, 1:steps + 1].to(logits.device)  # (B, T)
    if lengths is None:
        lengths = (captions != pad_id).sum(dim=1)  # (B,)
    real = step_mask(lengths, steps, logits.device)  # (B, T)
    # mean over the real tokens; padded steps are ignored, not gathered out (which would
    # copy the real rows of the (B, T, V) logits and scatter their gradient back)
    xent = F.cross_entropy(logits.reshape(-1, logits.size(-1)),  # (B*T, V)
                           targets.masked_fill(~real, -100).reshape(-1), ignore_index=-100)
    attention_total = (alphas * real.unsqueeze(2).to(alphas.dtype)).sum(dim=1)  # (B, P)
    reg = ((1.0 - attention_total) ** 2).sum(dim=1).mean()  # scalar
    return xent, reg, float(real.sum())


def caption_loss(
    logits: torch.Tensor,
    captions: torch.Tensor,
    lengths: torch.Tensor | None,
    alphas: torch.Tensor,
    alpha_c: float = 1.0,
    pad_id: int = 0,
    weights: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over real tokens + the doubly stochastic attention regulariser.

        loss = mean_{b, t real} -log p(y_bt) + alpha_c * mean_b sum_i (1 - sum_{t real} alpha_bti)^2

    Args:
        logits: (B, T, V) from `DecoderWithAttention.forward` (T = L - 1).
        captions: (B, L) the same captions; targets are captions[:, 1:].
        lengths: (B,) tokens per caption incl. <start>/<end>; None: count non-`pad_id` tokens.
        alphas: (B, T, P) attention weights.
        alpha_c: lambda, the weight of the regulariser (0 switches it off).
        pad_id: id of the padding token (only used when `lengths` is None).
        weights: (per-token, per-caption) factors of the two terms, which are means over
            this batch: data-parallel training passes each process's share of the global
            batch (`distributed.split_batch`); None (one process) is the plain loss.

    Returns:
        the scalar loss (with gradient) and {"xent": ..., "reg": ..., "tokens": ...} as floats.
    """
    xent, reg, tokens = loss_terms(logits, captions, lengths, alphas, pad_id)
    loss = xent + alpha_c * reg if weights is None else weights[0] * xent + alpha_c * weights[1] * reg
    return loss, {"xent": float(xent.detach()), "reg": float(reg.detach()), "tokens": tokens}
