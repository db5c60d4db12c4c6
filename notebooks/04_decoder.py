# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Decoder: an LSTM that attends while it writes
#
# **In this chapter you will learn**
#
# - the LSTM equations of the paper, and how the context vector enters them;
# - the gate $\beta$ that decides how much of the image each word uses;
# - *teacher forcing*: how a whole caption is trained in one pass;
# - the loss over captions of different lengths (padding masked out) and the *doubly
#   stochastic* attention regulariser;
# - the shape of every tensor in one training step, and how decoding one word at a time
#   (`step`) reproduces it;
# - how the model, its vocabulary and its configuration are saved and loaded safely.

# %% tags=["hide-input"]
# Setup. On Colab: install this book's package from its repository (Colab's own PyTorch
# is kept) and, if you want, keep the workspace on Google Drive. Locally `make` has
# installed it already, so nothing happens here
import os
import subprocess
import sys

REPO_URL = "https://github.com/show-attend-tell-book/show-attend-tell-book"
KEEP_ON_DRIVE = False  # Colab: True keeps data, feature cache and runs on your Google Drive
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"], check=True)
    if KEEP_ON_DRIVE:  # the book's page "Running on Colab" says what is kept where
        from google.colab import drive

        drive.mount("/content/drive")
        os.environ["CAPTION_LIB_HOME"] = "/content/drive/MyDrive/caption_lib"

# %% tags=["parameters"]
# Parameters: small sizes keep this chapter fast on a CPU (the book's model uses 512).
# DATASET changes nothing here: this chapter's inputs are made up, the same on Colab
DATASET = "shapes"
SEED = 0
EMBED_DIM = 32
DECODER_DIM = 32
ATTENTION_DIM = 32
OVERFIT_STEPS = 100

# %%
# NBVAL_IGNORE_OUTPUT
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import caption_lib
from caption_lib import (
    Captioner,
    CaptionerConfig,
    DecoderWithAttention,
    Vocabulary,
    caption_loss,
    collate_captions,
)

device = caption_lib.pick_device("auto")
caption_lib.seed_everything(SEED)
print(f"caption_lib {caption_lib.__version__} on {device}")

# %% [markdown]
# ## The LSTM of "Show, Attend and Tell"
#
# The decoder writes a caption $y_1, \dots, y_C$ one word at a time. At step $t$ it has
# three inputs: the previous word $y_{t-1}$ as an embedding $E y_{t-1} \in \mathbb{R}^D$,
# its own previous state $h_{t-1}, c_{t-1} \in \mathbb{R}^H$, and the context vector
# $\hat z_t \in \mathbb{R}^E$ of chapter 3 — what it sees of the image for this word. A
# long short-term memory {cite:p}`hochreiter1997long` combines them (the paper's equations
# (1)–(3), with $T$ an affine map and $\sigma$ the logistic sigmoid):
#
# $$
# \begin{pmatrix} i_t \\ f_t \\ o_t \\ g_t \end{pmatrix} =
# \begin{pmatrix} \sigma \\ \sigma \\ \sigma \\ \tanh \end{pmatrix}
# T \begin{pmatrix} E y_{t-1} \\ h_{t-1} \\ \hat z_t \end{pmatrix}
# $$ (eq-lstm-gates)
#
# $$
# c_t = f_t \odot c_{t-1} + i_t \odot g_t
# $$ (eq-lstm-cell)
#
# $$
# h_t = o_t \odot \tanh(c_t)
# $$ (eq-lstm-hidden)
#
# The input gate $i_t$ decides what is written into the memory $c_t$, the forget gate
# $f_t$ what is kept, the output gate $o_t$ what is shown as $h_t$. `torch.nn.LSTMCell`
# computes exactly these, with $T$ split into a matrix for the input
# $[E y_{t-1}; \hat z_t]$ (`weight_ih`, shape $(4H, D + E)$) and one for $h_{t-1}$
# (`weight_hh`, shape $(4H, H)$).
#
# **Where to start.** The first state comes from the image: the mean of the regions
# through two linear layers (the paper's $f_{\text{init},c}$ and $f_{\text{init},h}$),
#
# $$
# c_0 = f_{\text{init},c}\Big(\frac{1}{P}\sum_{i=1}^{P} a_i\Big), \qquad
# h_0 = f_{\text{init},h}\Big(\frac{1}{P}\sum_{i=1}^{P} a_i\Big).
# $$ (eq-init)
#
# **The gate $\beta$.** Some words ("a", "of") need no image at all. The paper (Sec. 4.2.1)
# lets the decoder scale the context by a gate computed from its state,
#
# $$
# \beta_t = \sigma\big(f_\beta(h_{t-1})\big) \in (0, 1)^E, \qquad
# \hat z_t = \beta_t \odot \sum_{i=1}^{P} \alpha_{ti}\, a_i ,
# $$ (eq-beta)
#
# and reports that it makes the attention maps sharper. (`caption_lib` uses one gate per
# feature, as the common implementations do; the paper's text reads as a scalar.)
#
# **The word.** The next-word distribution is a softmax over the vocabulary of a linear
# map of the (dropped-out) state, $p(y_t \mid a, y_{<t}) = \mathrm{softmax}(L_o\,
# \mathrm{dropout}(h_t))$ — the simple form used by most implementations; the paper's
# "deep output" also adds terms in $E y_{t-1}$ and $\hat z_t$.
#
# In `DecoderWithAttention`: `embedding` ($E$), `attention`, `f_beta`, `lstm`, `init_h`,
# `init_c`, `dropout` and `fc` ($L_o$).

# %%
# NBVAL_CHECK_OUTPUT
V, E = 20, 2048
torch.manual_seed(SEED)
decoder = DecoderWithAttention(V, encoder_dim=E, embed_dim=EMBED_DIM, decoder_dim=DECODER_DIM,
                               attention_dim=ATTENTION_DIM, dropout=0.5)
D, H = EMBED_DIM, DECODER_DIM
assert decoder.lstm.weight_ih.shape == (4 * H, D + E)
assert decoder.lstm.weight_hh.shape == (4 * H, H)
assert decoder.fc.weight.shape == (V, H)
for name, module in decoder.named_children():
    print(f"{name:10s} {module}")

# %% [markdown]
# ## Teacher forcing
#
# To train, the decoder reads the *reference* caption and predicts it shifted by one: the
# input at step $t$ is the true word $y_{t-1}$ (not the word the model itself would have
# chosen), the target is $y_t$. This is *teacher forcing*: all steps of a caption have
# their inputs from the start, and a caption of $L$ tokens (with `<start>` and `<end>`)
# gives $L - 1$ predictions. A batch of captions of different lengths is padded with
# `<pad>` (= 0) to the longest, and the lengths are kept:

# %%
# NBVAL_CHECK_OUTPUT
texts = ["a big red circle", "a small blue square left of a green triangle",
         "two yellow circles"]
vocab = Vocabulary.build(texts)
batch = [(torch.zeros(1), vocab.encode(t)) for t in texts]
_, captions, lengths, _ = collate_captions(batch, pad_id=vocab.pad_id)
inputs, targets = captions[:, :-1], captions[:, 1:]  # (B, L-1) each
assert captions.shape == (3, 11) and inputs.shape == targets.shape == (3, 10)
print("lengths:", lengths.tolist())
for t in range(5):
    print(f"step {t}: reads {vocab.itos[inputs[2, t]]:8s} -> predicts {vocab.itos[targets[2, t]]}")

# %% [markdown]
# ## Different lengths: masking or shrinking?
#
# The third caption ends after 4 steps but the batch runs for 10. There are two ways to
# handle that:
#
# - **masking**: run every step for the whole batch, and leave the padded steps out of the
#   loss. Simplest; the work of the padded steps is wasted.
# - **sort and shrink** (the best-known PyTorch tutorial does this): sort the batch by
#   length, and at step $t$ run only the captions still going — a prefix of the sorted
#   batch. It saves the padded steps, at the cost of sorting and slicing.
#
# `caption_lib` measured both (`benchmarks/bench_decoder.py`: one training step, batch 32,
# lengths 10–20, dims 512, vocabulary 5000, 2 CPU threads; on a quiet machine): about
# 0.53 s per step masking only, 0.49 s shrinking — 8% faster, and more when lengths vary
# more. So `forward` shrinks, *inside*: it sorts a copy of the batch, runs step $t$ on the
# first `running[t]` captions, and returns logits and weights in the caller's order; the
# loss masks the padded steps all the same. Two other choices matter far more for speed:
# the regions are projected to attention space **once per caption** (chapter 3), and the
# output layer $L_o$ — the biggest matrix, $H \times V$ — runs **once on all steps** after
# the loop instead of once per step. Against the tutorial's way (projection and output
# layer inside the loop), the same benchmark measured about 1.1 s per step: `caption_lib`
# is about 2.2 times faster (the goal was 3; most of what remains is the LSTM's own
# matrix products, which no reordering removes).
#
# ## One training step, shape by shape
#
# Below, one training step spelled out with the decoder's own layers, on the three
# captions above and random "images" (features of $P = 49$ regions of $E = 2048$). For
# clarity it runs every step on the whole batch (masking); `forward` does the same maths
# with the shrinking described above. Letters: $B$ batch, $L$ padded caption length,
# $T = L - 1$ steps, $D$ embedding, $H$ state, $A$ attention, $V$ vocabulary.

# %%
decoder = DecoderWithAttention(len(vocab), encoder_dim=E, embed_dim=EMBED_DIM,
                               decoder_dim=DECODER_DIM, attention_dim=ATTENTION_DIM)
decoder.eval()  # no dropout, so that the walk-through and `forward` agree exactly
B, L = captions.shape
T, P, A, V = L - 1, 49, ATTENTION_DIM, len(vocab)
features = torch.randn(B, P, E)  # the encoder's regions a

embedded = decoder.embedding(captions[:, :T])  # E y_{t-1} for all steps at once
h, c = decoder.init_state(features)  # eq. (eq-init)
projected = decoder.attention.project(features)  # W_a a, once per caption
hiddens, alphas = [], []
for t in range(T):
    context, alpha = decoder.attention(features, h, projected=projected)  # chapter 3
    gate = torch.sigmoid(decoder.f_beta(h))  # beta_t, eq. (eq-beta)
    x = torch.cat([embedded[:, t], gate * context], dim=1)  # [E y_{t-1}; z_t]
    h, c = decoder.lstm(x, (h, c))  # eqs. (eq-lstm-gates)-(eq-lstm-hidden)
    hiddens.append(h)
    alphas.append(alpha)
hidden = torch.stack(hiddens, dim=1)  # all states
logits = decoder.fc(decoder.dropout(hidden))  # L_o on all steps at once

assert embedded.shape == (B, T, D) and projected.shape == (B, P, A)
assert context.shape == (B, E) and alpha.shape == (B, P) and gate.shape == (B, E)
assert x.shape == (B, D + E) and h.shape == c.shape == (B, H)
assert hidden.shape == (B, T, H) and logits.shape == (B, T, V)

# %%
# NBVAL_CHECK_OUTPUT
for name, tensor in [("features a", features), ("captions", captions),
                     ("embedded", embedded), ("h, c", h), ("projected", projected),
                     ("context (one step)", context), ("alpha (one step)", alpha),
                     ("gate beta", gate), ("LSTM input x", x), ("hidden (all steps)", hidden),
                     ("logits", logits)]:
    print(f"{name:20s} {tuple(tensor.shape)}")

# %% [markdown]
# `forward` returns the same logits on the real steps (it does not compute the padded
# ones), and the attention weights of every step, zero at padded steps:

# %%
# NBVAL_CHECK_OUTPUT
with torch.no_grad():
    logits_lib, alphas_lib = decoder(features, captions, lengths)
real = torch.arange(T).unsqueeze(0) < (lengths - 1).unsqueeze(1)  # (B, T) real steps
assert torch.allclose(logits_lib[real], logits[real], atol=1e-5)
assert torch.allclose(alphas_lib, torch.stack(alphas, dim=1) * real.unsqueeze(2), atol=1e-6)
print("logits", tuple(logits_lib.shape), "alphas", tuple(alphas_lib.shape))
print("attention mass per step, caption 3:", alphas_lib[2].sum(dim=1).round().int().tolist())

# %% [markdown]
# ## The loss
#
# Training maximises the log-likelihood of the reference words — the mean cross-entropy
# over the **real** tokens only ($N$ of them; the padded steps are masked out, so padding
# never changes the loss) — plus the paper's *doubly stochastic* regulariser (Sec. 4.2.1):
#
# $$
# \mathcal{L} = -\frac{1}{N} \sum_{b} \sum_{t \le C_b} \log p(y_{bt} \mid a_b, y_{b,<t})
# \;+\; \lambda \,\frac{1}{B} \sum_b \sum_{i=1}^{P} \Big(1 - \sum_{t \le C_b} \alpha_{bti}\Big)^2
# $$ (eq-loss)
#
# The weights of one step sum to one over the regions by construction. The regulariser
# asks the same, roughly, *over the steps* for each region: every part of the image should
# receive about one step's worth of attention over the whole caption. It discourages a
# decoder that stares at the same few cells for every word; the paper credits it with
# better captions and richer attention maps. `caption_loss` returns the total and its two
# parts as numbers ($\lambda$ is `alpha_c`).

# %%
# NBVAL_CHECK_OUTPUT
loss, parts = caption_loss(logits_lib, captions, lengths, alphas_lib, alpha_c=1.0)
n_real = int((lengths - 1).sum())
assert parts["tokens"] == n_real == int(real.sum())
logp = F.log_softmax(logits_lib, dim=2).gather(2, captions[:, 1:].unsqueeze(2)).squeeze(2)
xent = -(logp * real).sum() / n_real  # masked mean over the real tokens
assert abs(parts["xent"] - xent.item()) < 1e-5
print(f"real tokens: {n_real} of {B * T} steps")
print(f"cross-entropy close to log V = {torch.log(torch.tensor(float(V))):.2f} "
      f"for an untrained model: {abs(parts['xent'] - torch.log(torch.tensor(float(V)))) < 0.5}")

# %% [markdown]
# Padding really is invisible: garbage in the padded positions changes neither the loss
# nor the real logits.

# %%
# NBVAL_CHECK_OUTPUT
noisy = captions.clone()
noisy[~torch.cat([torch.ones(B, 1, dtype=torch.bool), real], dim=1)] = 5  # fill the padding
with torch.no_grad():
    logits_noisy, alphas_noisy = decoder(features, noisy, lengths)
loss_noisy, _ = caption_loss(logits_noisy, noisy, lengths, alphas_noisy)
assert torch.allclose(loss_noisy, loss)
print("same loss with garbage in the padding:", torch.allclose(loss_noisy, loss))

# %% [markdown]
# What the regulariser rewards: for a caption of 5 steps over 49 regions, attention that
# stays on one region costs more than attention that moves to a new region at every step;
# spreading thinly over all regions costs least (the cross-entropy, not the regulariser,
# is what makes attention pick regions).

# %%
# NBVAL_CHECK_OUTPUT
steps, regions = 5, 49
staring = torch.zeros(1, steps, regions)
staring[0, :, 0] = 1.0  # every step on region 0
moving = torch.zeros(1, steps, regions)
moving[0, torch.arange(steps), torch.arange(steps)] = 1.0  # one new region per step
uniform = torch.full((1, steps, regions), 1 / regions)
dummy_logits, dummy_caption = torch.zeros(1, steps, 4), torch.ones(1, steps + 1, dtype=torch.long)
for name, a in [("staring", staring), ("moving", moving), ("uniform", uniform)]:
    _, parts = caption_loss(dummy_logits, dummy_caption, torch.tensor([steps + 1]), a)
    print(f"{name:8s} regulariser = {parts['reg']:.2f}")

# %% [markdown]
# ## Decoding one word at a time: `step`
#
# At test time there is no reference caption: the decoder feeds back its own words, one
# step at a time. `step(tokens, state, features, projected)` is that one step, built from
# the same pieces as `forward` (it is what chapter 6's greedy and beam search call). Run
# over a reference caption in eval mode, it reproduces `forward` exactly:

# %%
# NBVAL_CHECK_OUTPUT
with torch.no_grad():
    state = decoder.init_state(features)
    projected = decoder.project(features)  # once per caption, as in `forward`
    for t in range(T):
        step_logits, state, step_alpha = decoder.step(captions[:, t], state, features,
                                                      projected)
        ok = real[:, t]  # compare the captions still running at step t
        assert torch.allclose(step_logits[ok], logits_lib[ok, t], atol=1e-5)
        assert torch.allclose(step_alpha[ok], alphas_lib[ok, t], atol=1e-6)
print("step-by-step logits == forward logits: True")
print("shapes:", tuple(step_logits.shape), tuple(state[0].shape), tuple(step_alpha.shape))

# %% [markdown]
# ## Can it learn? Overfitting one batch
#
# A quick sanity check for any model: it must be able to memorise a single batch. A few
# shapes captions, random "images", no dropout, 100 steps of Adam:

# %% mystnb={"image": {"alt": "Cross-entropy and attention regulariser on a log scale, falling over the steps of overfitting one batch"}}
torch.manual_seed(SEED)
tiny = DecoderWithAttention(len(vocab), encoder_dim=E, embed_dim=EMBED_DIM,
                            decoder_dim=DECODER_DIM, attention_dim=ATTENTION_DIM, dropout=0.0)
optimizer = torch.optim.Adam(tiny.parameters(), lr=0.01)
history = []
for _ in range(OVERFIT_STEPS):
    logits, alphas = tiny(features, captions, lengths)
    loss, parts = caption_loss(logits, captions, lengths, alphas, alpha_c=1.0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    history.append(parts)
assert history[-1]["xent"] < history[0]["xent"] / 10

fig, ax = plt.subplots(figsize=(6, 3))
ax.semilogy([p["xent"] for p in history], label="cross-entropy")
ax.semilogy([p["reg"] for p in history], label="attention regulariser")
ax.set_xlabel("step")
ax.set_title("Overfitting one batch of 3 captions")
ax.legend()
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print(f"cross-entropy fell more than 10x: {history[-1]['xent'] < history[0]['xent'] / 10}")

# %% [markdown]
# ## The baseline without attention
#
# To see what attention buys (chapter 5 trains both), `use_attention=False` gives a
# "Show and Tell"-like decoder {cite:p}`xu2015show`: the same LSTM, but the context is the
# *mean* of the regions at every step — as if the weights were always uniform, $1/P$.

# %%
# NBVAL_CHECK_OUTPUT
baseline = DecoderWithAttention(len(vocab), encoder_dim=E, embed_dim=EMBED_DIM,
                                decoder_dim=DECODER_DIM, use_attention=False).eval()
with torch.no_grad():
    _, alphas_base = baseline(features, captions, lengths)
assert baseline.attention is None
assert torch.allclose(alphas_base[1], torch.full((T, P), 1 / P))
print("baseline alphas:", tuple(alphas_base.shape), "all equal to 1/49:",
      torch.allclose(alphas_base[1], torch.full((T, P), 1 / P)))

# %% [markdown]
# ## The whole model, saved safely
#
# `Captioner` holds the vocabulary, the encoder of chapter 2 and this decoder, built from a
# `CaptionerConfig`. Its checkpoints are plain data — the configuration and vocabulary as
# JSON text, the `state_dict`s of the decoder and of the encoder's *trainable* part, and a
# fingerprint of the frozen part (rebuilt from its weights or seed, not stored) — written
# atomically and read with `torch.load(..., weights_only=True)`, which refuses to run
# code hidden in a file. A file that is not a `caption_lib` checkpoint, or a damaged one,
# fails with one line saying so.

# %%
# NBVAL_CHECK_OUTPUT
config = CaptionerConfig(encoder_weights=None, fine_tune="layer4", embed_dim=EMBED_DIM,
                         decoder_dim=DECODER_DIM, attention_dim=ATTENTION_DIM)
model = Captioner(vocab, config).eval()
folder = Path(tempfile.mkdtemp())
path = model.save(folder / "model.pt", extra={"epoch": 0})
loaded = Captioner.load(path).eval()
with torch.no_grad():
    same = torch.equal(model.decoder(features, captions, lengths)[0],
                       loaded.decoder(features, captions, lengths)[0])
assert same and loaded.vocab.itos == vocab.itos and loaded.config == config
print("round trip gives identical logits:", same)
print("encoder weights:", loaded.encoder.weights_used)
(folder / "notes.pt").write_bytes(b"these are not model weights")
try:
    Captioner.load(folder / "notes.pt")
except caption_lib.CaptionLibError as err:
    print("error:", str(err).replace(str(folder), "...").split(" (")[0])

# %% [markdown]
# ## Summary
#
# - The decoder is an LSTM ({eq}`eq-lstm-gates`–{eq}`eq-lstm-hidden`) whose input is the
#   previous word and the gated context $\beta_t \odot \hat z_t$ ({eq}`eq-beta`); its
#   state starts from the mean region ({eq}`eq-init`).
# - Teacher forcing trains all $L - 1$ steps of a caption in one pass; padded steps are
#   masked out of the loss ({eq}`eq-loss`), together with the doubly stochastic
#   regulariser that spreads attention over the image.
# - Speed comes from projecting the regions once per caption, applying the output layer
#   once to all steps, and running only the captions still going (sort and shrink);
#   `step` decodes one word with the same pieces.
# - `Captioner` saves configuration, vocabulary and weights as plain data and loads them
#   with `weights_only=True`.
#
# ## Exercises
#
# **Exercise 1.** Implement one decoding step with the layers of a `DecoderWithAttention`
# `dec`: from the previous words `tokens` `(B,)` and the state `(h, c)`, return the
# next-word logits `(B, V)`, the new state and the attention weights `(B, P)` — what
# `dec.step` does ({eq}`eq-lstm-gates`–{eq}`eq-beta`).

# %% nbgrader={"grade": false, "grade_id": "ex1-solution", "locked": false, "schema_version": 3, "solution": true}
def decode_step(dec: DecoderWithAttention, tokens: torch.Tensor, state, features: torch.Tensor,
                projected: torch.Tensor):
    ### BEGIN SOLUTION
    h, c = state
    context, alpha = dec.attention(features, h, projected=projected)
    gate = torch.sigmoid(dec.f_beta(h))
    x = torch.cat([dec.embedding(tokens), gate * context], dim=1)
    h, c = dec.lstm(x, (h, c))
    return dec.fc(dec.dropout(h)), (h, c), alpha
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex1-test", "locked": true, "points": 2, "schema_version": 3, "solution": false}
dec = DecoderWithAttention(12, encoder_dim=6, embed_dim=5, decoder_dim=4, attention_dim=3).eval()
f = torch.randn(2, 7, 6)
tokens = torch.tensor([1, 3])
with torch.no_grad():
    mine = decode_step(dec, tokens, dec.init_state(f), f, dec.project(f))
    ref = dec.step(tokens, dec.init_state(f), f, dec.project(f))
assert torch.allclose(mine[0], ref[0], atol=1e-6) and torch.allclose(mine[2], ref[2], atol=1e-6)
### BEGIN HIDDEN TESTS
with torch.no_grad():
    s_mine = s_ref = dec.init_state(f)
    for t in range(4):
        tokens = torch.randint(0, 12, (2,), generator=torch.Generator().manual_seed(t))
        out_mine = decode_step(dec, tokens, s_mine, f, dec.project(f))
        out_ref = dec.step(tokens, s_ref, f, dec.project(f))
        s_mine, s_ref = out_mine[1], out_ref[1]
        assert torch.allclose(out_mine[0], out_ref[0], atol=1e-5)
        assert torch.allclose(s_mine[1], s_ref[1], atol=1e-5)
### END HIDDEN TESTS
print("Exercise 1: correct")

# %% [markdown]
# **Exercise 2.** Write `masked_xent(logits, captions, lengths)`: the mean cross-entropy
# of `logits` `(B, T, V)` against the targets `captions[:, 1:]` over the real tokens only
# (step $t$ of caption $b$ is real when $t <$ `lengths[b] - 1`). Do not use
# `caption_loss`. What would the loss be if you averaged over all $B \cdot T$ positions
# instead, and why is that wrong?

# %% nbgrader={"grade": false, "grade_id": "ex2-solution", "locked": false, "schema_version": 3, "solution": true}
def masked_xent(logits: torch.Tensor, captions: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
    ### BEGIN SOLUTION
    T = logits.size(1)
    real = torch.arange(T).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    return F.cross_entropy(logits[real], captions[:, 1:T + 1][real])
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex2-test", "locked": true, "points": 2, "schema_version": 3, "solution": false}
_, ref = caption_loss(logits_lib, captions, lengths, alphas_lib, alpha_c=0.0)
assert abs(masked_xent(logits_lib, captions, lengths).item() - ref["xent"]) < 1e-5
### BEGIN HIDDEN TESTS
for seed in range(5):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 9, (4,), generator=g)
    caps = torch.randint(1, 10, (4, int(lens.max())), generator=g)
    lg = torch.randn(4, caps.size(1) - 1, 10, generator=g)
    al = torch.zeros(4, caps.size(1) - 1, 3)
    assert abs(masked_xent(lg, caps, lens).item()
               - caption_loss(lg, caps, lens, al, alpha_c=0.0)[1]["xent"]) < 1e-5
### END HIDDEN TESTS
print("Exercise 2: correct")
