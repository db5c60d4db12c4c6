"""Soft attention over image regions: additive ("Bahdanau") attention.

Xu et al. 2015, "Show, Attend and Tell", Sec. 4.2.1 (deterministic soft attention), with
the attention model f_att of Bahdanau et al. 2015: at every time step t the decoder scores
each region i of the image from its previous hidden state h_{t-1},

    e_ti     = w^T tanh(W_a a_i + W_h h_{t-1})        (a score, one per region)
    alpha_ti = exp(e_ti) / sum_k exp(e_tk)             (softmax over the P regions)
    z_t      = sum_i alpha_ti a_i                      (the context vector)

W_a a_i does not depend on t, so it is computed ONCE per sequence (`project`) and passed
to every step (`projected=`): this is the single largest saving over recomputing it at
each step (B*P*E*A multiply-adds per step, 1.6 GFLOP at the book's sizes).

Shapes: B batch, P regions (49 = 7x7), E encoder dim (2048), H decoder (LSTM) dim,
A attention dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# rows per piece of the scores without autograd: (8, 49, 512) fp32 is 0.8 MB, well inside
# a core's L2 cache (2 MiB on the Xeon this was measured on; `Attention._scores_in_chunks`)
CHUNK = 8


class Attention(nn.Module):
    """Additive attention: `forward(features, hidden) -> (context, alpha)`.

    Args:
        encoder_dim: E, size of one region feature a_i.
        decoder_dim: H, size of the decoder state h.
        attention_dim: A, size of the space where regions and state are compared.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)  # W_a (its bias: b_a)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)  # W_h
        self.full_att = nn.Linear(attention_dim, 1)  # w

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """W_a a_i for every region: `(B, P, E) -> (B, P, A)`; once per sequence."""
        return self.encoder_att(features)  # (B, P, A)

    def forward(
        self,
        features: torch.Tensor,
        hidden: torch.Tensor,
        projected: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over the regions of `features` given the decoder state `hidden`.

        Args:
            features: (B, P, E) region features a_i.
            hidden: (B, H) the decoder's previous hidden state h_{t-1}.
            projected: (B, P, A) `self.project(features)`, computed once per sequence;
                computed here when None (same result, slower inside a loop).
            mask: optional (B, P) bool, True for real regions; masked regions get
                alpha exactly 0. Every row needs at least one True.

        Returns:
            context (B, E) = sum_i alpha_i a_i, and alpha (B, P) (each row sums to 1).
        """
        if projected is None:
            projected = self.project(features)  # (B, P, A)
        return self.weigh(features, self.decoder_att(hidden), projected, mask)

    def weigh(self, features: torch.Tensor, query: torch.Tensor, projected: torch.Tensor,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` from the query W_h h_{t-1} (B, A) instead of h_{t-1}: the decoder
        computes the query in one product with its other uses of h_{t-1}. Other arguments
        and the result as for `forward` (`projected` is required)."""
        alpha = self.weights(query, projected, mask)  # (B, P)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, E)
        return context, alpha

    def weights(self, query: torch.Tensor, projected: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """alpha (B, P) alone, from the query W_h h_{t-1} (B, A) and `projected` (B, P, A);
        the decoder's training loop makes the context itself (`recurrent.StepInput.mix`).
        Without autograd on a CPU (decoding) the scores come from `_scores_in_chunks`."""
        chunked = projected.device.type == "cpu" and not (
            torch.is_grad_enabled() and (query.requires_grad or projected.requires_grad))
        if chunked:
            scores = self._scores_in_chunks(query, projected)  # (B, P), at least fp32
        else:
            query = query.unsqueeze(1)  # (B, 1, A)
            scores = self.full_att((projected + query).tanh_()).squeeze(2)  # (B, P), tanh in place
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # (B, P)
        alpha = torch.softmax(scores, dim=1)  # (B, P)
        # bf16 inputs: alpha in bf16, as the one-piece scores would give it
        return alpha.to(projected.dtype) if chunked else alpha  # (B, P)

    def _scores_in_chunks(self, query: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """e = w^T tanh(W_a a_i + W_h h) (B, P) without autograd, on a CPU: `CHUNK` rows at
        a time through one reused (CHUNK, P, A) buffer, so that each chunk's sum stays in
        the cache for its tanh and its product with w (the sum in one piece, 9.6 MB for a
        beam search of 32 images with k 3, is a fresh allocation at every step). The sum,
        tanh and product are computed in fp32 even for bf16 inputs (the bf16 search):
        a bf16 tanh over (96, 49, 512) took 1.8 ms against 0.34 ms in fp32 on an Intel Xeon
        with AMX (benchmarks/bench_attention.py measures both ways and the tanh). A bf16
        chunk is converted, then added: a mixed-dtype add rounded the sum to bf16 and was
        slower (the bf16 search ran 1.02-1.03x faster without it).

        The tanh is computed as 2 sigma(2x) - 1, its constants folded into w and b
        (`sigmoid_form`): on a 2-core AMD EPYC, torch's fp32 tanh over (96, 49, 512) took
        3.3 ms and the doubling and sigmoid 0.7 ms (results/attention__epyc.json), and
        the batched beam search of benchmarks/bench_beam.py got 1.05-1.09x faster in fp32
        and 1.24-1.26x in bf16 (side by side, two runs), same captions. Training keeps the
        tanh itself (autograd, above): there the saving was within the noise of a whole
        training step, and the recorded training curves stay exactly reproducible."""
        B, P, A = projected.shape
        dtype = torch.promote_types(torch.result_type(projected, query), torch.float32)
        weight, bias = sigmoid_form(self.full_att.weight.to(dtype),
                                    self.full_att.bias.to(dtype))  # (1, A), (1,)
        buffer = projected.new_empty((min(B, CHUNK), P, A), dtype=dtype)  # (CHUNK, P, A)
        query = query.to(dtype).unsqueeze(1)  # (B, 1, A)
        scores = []
        for start in range(0, B, CHUNK):
            rows = min(CHUNK, B - start)
            if projected.dtype == dtype:
                part = torch.add(projected[start:start + rows], query[start:start + rows],
                                 out=buffer[:rows])  # (rows, P, A)
            else:  # bf16 search: converted, then added in fp32 (faster than a mixed add)
                part = buffer[:rows].copy_(projected[start:start + rows]).add_(
                    query[start:start + rows])  # (rows, P, A)
            part = part.mul_(2.0).sigmoid_()  # sigma(2x), (rows, P, A): tanh(x) = 2 sigma(2x) - 1
            scores.append(F.linear(part, weight, bias).squeeze(2))  # (rows, P)
        return torch.cat(scores) if scores else projected.new_zeros(0, P, dtype=dtype)  # (B, P)


def sigmoid_form(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w, b of `w^T tanh(x) + b` -> (2w, b - sum(w)), the same scores from sigma(2x):
    tanh(x) = 2 sigma(2x) - 1, so w^T tanh(x) + b = (2w)^T sigma(2x) + (b - sum_j w_j).
    weight (1, A), bias (1,) -> (1, A), (1,)."""
    return weight * 2.0, bias - weight.sum(dim=1)  # (1, A), (1,)
