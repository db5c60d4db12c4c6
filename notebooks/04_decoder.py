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
# **The word.** The paper's output layer is a "deep output" (Sec. 3.1.2, Eq. 7): the
# previous word, the new state and the gated context are each mapped to the embedding size
# $D$ and added before the vocabulary layer $L_o$,
#
# $$
# p(y_t \mid a, y_{<t}) = \mathrm{softmax}\Big(L_o\, \mathrm{dropout}\big(\tanh(E y_{t-1}
# + L_h h_t + L_z \hat z_t)\big)\Big).
# $$ (eq-deep-output)
#
# So the word can be read off the region the decoder looks at *now* ($\hat z_t$), not only
# through the LSTM's memory. Eq. 7 writes no non-linearity; like the readout of the
# attention decoders of that time (dl4mt / Nematus: a tanh of the three terms, then
# dropout), `caption_lib` puts a tanh and dropout before $L_o$. Most re-implementations use
# the simpler $\mathrm{softmax}(W_o\, \mathrm{dropout}(h_t))$ instead; `deep_output=False`
# gives that. The book's recipes use the deep output: on shapes it grounds the words far
# better (chapter 5's settings table has the measurement).
#
# In `DecoderWithAttention(..., deep_output=True)`: `embedding` ($E$), `attention`,
# `f_beta`, `lstm`, `init_h`, `init_c`, `dropout`, `out_h` ($L_h$), `out_z` ($L_z$) and
# `fc` ($L_o$).

# %%
# NBVAL_CHECK_OUTPUT
V, E = 20, 2048
torch.manual_seed(SEED)
decoder = DecoderWithAttention(V, encoder_dim=E, embed_dim=EMBED_DIM, decoder_dim=DECODER_DIM,
                               attention_dim=ATTENTION_DIM, dropout=0.5, deep_output=True)
D, H = EMBED_DIM, DECODER_DIM
assert decoder.lstm.weight_ih.shape == (4 * H, D + E)
assert decoder.lstm.weight_hh.shape == (4 * H, H)
assert decoder.out_h.weight.shape == (D, H) and decoder.out_z.weight.shape == (D, E)
assert decoder.fc.weight.shape == (V, D)
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
# - **sort and shrink** (sgrvinod's
#   [PyTorch tutorial to image captioning](https://github.com/sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning),
#   the best-known one, does this): sort the batch by length, and at step $t$ run only the
#   captions still going — a prefix of the sorted batch. It saves the padded steps, at the
#   cost of sorting and slicing.
#
# `caption_lib` measured both (`benchmarks/bench_decoder.py`: one training step, batch 32,
# lengths 10–20, dims 512, vocabulary 5000; the cell below reads its result file). So
# `forward` shrinks, *inside*: it sorts a copy of the batch, runs step $t$ on the first
# `running[t]` captions, and returns logits and weights in the caller's order; the loss
# masks the padded steps all the same. Two other choices matter far more for speed: the
# regions are projected to attention space **once per caption** (chapter 3), and the
# output layer — the biggest matrix, $D \times V$ — runs **once on all steps** after the
# loop instead of once per step. The benchmark also times the tutorial's formulation
# (projection and output layer inside the loop, written out in the benchmark, not copied).
#
# Four more arrangements make the loop itself cheaper without changing its maths
# (`DecoderWithAttention.prepare` and `caption_lib.recurrent`):
#
# - $h_{t-1}$ enters three products: the attention's query $W_h h_{t-1}$, the gate
#   $f_\beta(h_{t-1})$ and the LSTM's $W_{hh} h_{t-1}$. They are computed as one product,
#   with the three matrices stacked.
# - The word's share of the LSTM input (the first $D$ columns of `weight_ih` times
#   $E y_{t-1}$) does not depend on the state. It is computed for all steps at once.
# - A weight used at every step gets its gradient from one matrix product over all steps.
#   Autograd would otherwise compute one small product per step and add it to the
#   gradient each time.
# - When the encoder is fine-tuned, the region features need a gradient too. Every step
#   reads them as the first $b_t$ rows of the sorted batch, and the context
#   $\hat z_t = \sum_i \alpha_{ti} a_i$ sends a gradient $\alpha_t g_t^\top$ to them.
#   Those gradients are summed once, after the loop, in one batched product per caption
#   ($\sum_t \alpha_t g_t^\top$). Autograd would write a zero-padded gradient of all the
#   features at every step and add it to the total.
#
# The weights stay in the modules listed above. `lstm` is an `nn.LSTMCell` that holds
# $W_{ih}$, $W_{hh}$ and the biases, so checkpoints do not change. The walk-through below
# uses those modules directly and checks that `forward` gives the same numbers.

# %%
# NBVAL_IGNORE_OUTPUT
import json

bench = Path("../benchmarks/results")  # in the repository, next to notebooks/
# decoder.json, and the same benchmark on other CPUs (decoder__<cpu>.json)
files = sorted(bench.glob("decoder*.json"))
for path in files:
    result = json.loads(path.read_text())
    ms = result["ms_per_step_median"]
    print(f"{path.name}: {result.get('cpu', {}).get('model', 'CPU not recorded')}, "
          f"{result['threads']} threads, median of {result['reps']} steps "
          f"(1-minute load average {result['load_average_1min']})")
    for name in ["variable/caption_lib_mask_only", "variable/caption_lib", "variable/tutorial"]:
        print(f"  {name:32s} {ms[name]:7.1f} ms per step")
    print(f"  shrinking / masking only: "
          f"{ms['variable/caption_lib'] / ms['variable/caption_lib_mask_only']:.2f} of the time; "
          f"caption_lib is {ms['variable/tutorial'] / ms['variable/caption_lib']:.2f}x faster "
          "than the tutorial's formulation")
if not files:
    print(f"{bench} is not here (on Colab): the benchmark results live in the repository")

# %% [markdown]
# Shrinking saves a little over masking on these lengths, more when lengths vary more;
# the large factor comes from the arrangements above. The factor depends on the CPU (each
# file ran both sides in one process, on its own machine), but on every CPU measured the
# library's step is the faster by a wide margin. What remains is mostly the LSTM's own
# matrix products, which no reordering removes.
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
                               decoder_dim=DECODER_DIM, attention_dim=ATTENTION_DIM,
                               deep_output=True)
decoder.eval()  # no dropout, so that the walk-through and `forward` agree exactly
B, L = captions.shape
T, P, A, V = L - 1, 49, ATTENTION_DIM, len(vocab)
features = torch.randn(B, P, E)  # the encoder's regions a

embedded = decoder.embedding(captions[:, :T])  # E y_{t-1} for all steps at once
h, c = decoder.init_state(features)  # eq. (eq-init)
projected = decoder.attention.project(features)  # W_a a, once per caption
hiddens, alphas, zs = [], [], []
for t in range(T):
    context, alpha = decoder.attention(features, h, projected=projected)  # chapter 3
    gate = torch.sigmoid(decoder.f_beta(h))  # beta_t, eq. (eq-beta)
    x = torch.cat([embedded[:, t], gate * context], dim=1)  # [E y_{t-1}; z_t]
    h, c = decoder.lstm(x, (h, c))  # eqs. (eq-lstm-gates)-(eq-lstm-hidden)
    hiddens.append(h)
    alphas.append(alpha)
    zs.append(gate * context)  # the gated context z_t, for the output layer
hidden = torch.stack(hiddens, dim=1)  # all states
z_all = torch.stack(zs, dim=1)  # all gated contexts
deep = torch.tanh(embedded + decoder.out_h(hidden) + decoder.out_z(z_all))  # eq. (eq-deep-output)
logits = decoder.fc(decoder.dropout(deep))  # L_o on all steps at once

assert embedded.shape == (B, T, D) and projected.shape == (B, P, A)
assert context.shape == (B, E) and alpha.shape == (B, P) and gate.shape == (B, E)
assert x.shape == (B, D + E) and h.shape == c.shape == (B, H)
assert hidden.shape == (B, T, H) and z_all.shape == (B, T, E) and deep.shape == (B, T, D)
assert logits.shape == (B, T, V)

# %%
# NBVAL_CHECK_OUTPUT
for name, tensor in [("features a", features), ("captions", captions),
                     ("embedded", embedded), ("h, c", h), ("projected", projected),
                     ("context (one step)", context), ("alpha (one step)", alpha),
                     ("gate beta", gate), ("LSTM input x", x), ("hidden (all steps)", hidden),
                     ("z (all steps)", z_all), ("deep output", deep), ("logits", logits)]:
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
# "Show and Tell"-like decoder {cite:p}`vinyals2015show`: the same LSTM, but the context is the
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
# ## What this book changes from the paper
#
# {cite:t}`xu2015show` encode each image with the Oxford VGG network pretrained on
# ImageNet, not fine-tuned, and take the 14×14×512 feature map of the fourth convolutional
# layer of its last block, before max-pooling (`conv5_4`): 196 regions of 512 values
# (Sec. 4.3). They train
# two attention mechanisms, deterministic *soft* attention (Sec. 4.2, this chapter) and
# stochastic *hard* attention (Sec. 4.1). This book keeps the decoder of Sec. 3.1.2 and
# changes the pieces below; each row says why. The values in the "this book" columns are
# read from the code (`recipe`, a decoder built with the book's sizes), not typed.

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
from IPython.display import Markdown, display

from caption_lib.train import recipe

shapes_model, shapes_train = recipe("shapes")
colab_model, colab_train = recipe("flickr8k")
probe = DecoderWithAttention(10, encoder_dim=2048, embed_dim=8, decoder_dim=8, attention_dim=8)
beta_size = probe.f_beta.out_features  # one gate value per feature of the context
rows = [
    ("encoder", "VGG-19 `conv5_4`, ImageNet, frozen",
     "ResNet-50 to `layer4`; offline: random init, `layer4` fine-tuned; Colab: ImageNet, frozen",
     "a stronger, standard backbone today; offline there are no ImageNet weights (chapter 2)"),
    ("regions P × feature size E", "14×14 = 196 × 512", "7×7 = 49 × 2048",
     "ResNet-50's last stage has stride 32: 224 / 32 = 7"),
    ("gate β", "one scalar per step, $\\sigma(f_\\beta(h_{t-1}))$ (Sec. 4.2.1)",
     f"a vector of {beta_size} values per step, one per feature",
     "a per-feature gate, as most re-implementations use; the scalar is its special case"),
    ("output layer", "deep output: $L_o(E y_{t-1} + L_h h_t + L_z \\hat z_t)$ (Sec. 3.1.2, Eq. 7)",
     f"the same, with a tanh and dropout before $L_o$ (`deep_output={shapes_model.deep_output}` "
     "in the recipes; `False`: one linear layer on dropout($h_t$))",
     "Eq. 7 writes no non-linearity; the attention decoders of the time put a tanh there. "
     "On shapes the deep output grounds far better (chapter 5)"),
    ("regulariser λ", "$\\lambda \\sum_i (1 - \\sum_t \\alpha_{ti})^2$ over 196 regions",
     f"the same sum over 49 regions; λ = {shapes_model.alpha_c} (shapes), {colab_model.alpha_c} (Flickr8k)",
     "with many regions the sum outweighs the cross-entropy; on shapes it costs grounding, "
     "so the offline recipe leaves it out (chapter 5's settings table)"),
    ("attention mechanisms", "soft and hard", "soft (this chapter) and hard (the Hard attention chapter)", "—"),
    ("optimiser", "RMSProp (Flickr8k), Adam (Flickr30k, COCO)", "Adam, lr "
     f"{shapes_train.lr:g} (decoder) and {shapes_train.encoder_lr:g} (fine-tuned stage)",
     "the common choice today; one optimiser for every data set"),
    ("weights validated and kept", "the trained ones, with early stopping on BLEU (Sec. 4.3)",
     f"offline: an average of the last steps' weights (`ema_decay={shapes_train.ema_decay}`), "
     f"with early stopping as well; Flickr8k: the trained ones (`ema_decay={colab_train.ema_decay}`)",
     "on shapes the trained weights' F1 swings from epoch to epoch and their average's "
     "does not (chapter 5's settings table)"),
    ("sizes (embedding / LSTM / attention)", "not all stated", f"{shapes_model.embed_dim} / "
     f"{shapes_model.decoder_dim} / {shapes_model.attention_dim} (shapes), {colab_model.embed_dim} / "
     f"{colab_model.decoder_dim} / {colab_model.attention_dim} (Flickr8k)",
     "the shapes language is small, so is the offline model"),
    ("data", "Flickr8k, Flickr30k, COCO", "shapes (offline, generated), Flickr8k and COCO (Colab)",
     "a data set with ground truth makes correctness and grounding measurable"),
]
header = "| | paper | this book | why |\n|---|---|---|---|\n"
display(Markdown(header + "\n".join(f"| {' | '.join(r)} |" for r in rows)))

# %% [markdown]
# Two consequences for reading the numbers of this book. First, scores on shapes are not
# comparable with the paper's Table 1 (reproduced on the Results page): the shapes
# captions come from a grammar of a few dozen words, so a model that has learned it
# matches long $n$-grams of the references and reaches BLEU-4 scores far above what any
# model reaches on human captions of photographs. Second, the decoder here sees 49
# coarser regions instead of 196, so an attention map is a 7×7 grid, and a small object
# may cover only part of one cell.

# %% [markdown]
# ## Summary
#
# - The decoder is an LSTM ({eq}`eq-lstm-gates`–{eq}`eq-lstm-hidden`) whose input is the
#   previous word and the gated context $\beta_t \odot \hat z_t$ ({eq}`eq-beta`); its
#   state starts from the mean region ({eq}`eq-init`).
# - The word comes from the paper's deep output ({eq}`eq-deep-output`): the previous
#   word, the state and the gated context together, so it can be read off the region in
#   view.
# - Teacher forcing trains all $L - 1$ steps of a caption in one pass; padded steps are
#   masked out of the loss ({eq}`eq-loss`), together with the doubly stochastic
#   regulariser that spreads attention over the image.
# - Speed comes from projecting the regions once per caption, applying the output layer
#   once to all steps, and running only the captions still going (sort and shrink). The
#   loop's own products are arranged too: one product for everything $h_{t-1}$ feeds, the
#   word's share of the input for all steps at once, one weight-gradient product per
#   loop, and the features' gradient made once after the loop. `step` decodes one word
#   with the same pieces.
# - `Captioner` saves configuration, vocabulary and weights as plain data and loads them
#   with `weights_only=True`.

# %% [markdown]
# ## Exercises
#
# Exercise 1 is a task that needs thought, in the spirit of Stanford's CS231n: the LSTM
# step from its weights, checked against PyTorch's own cell by values and by numerical
# gradients. Exercise 2 is a quick check. The test cells say in one sentence what is
# wrong. The next cell imports what the exercises need, so this section also runs on its
# own (it is the chapter's nbgrader assignment: see *For instructors*).

# %%
# the exercises' imports
import torch
import torch.nn.functional as F

from caption_lib import checks

# %% [markdown]
# **Exercise 1 (task).** The decoder keeps its LSTM weights in an `nn.LSTMCell`
# (`decoder.lstm`); here you write what that cell computes. Implement `lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)` for a batch: input
# `x (B, D)`, state `h, c (B, H)`, weights `w_ih (4H, D)`, `w_hh (4H, H)` and biases
# `b_ih, b_hh (4H,)` laid out as in `nn.LSTMCell` — the rows of each are four blocks of
# $H$, for the input gate $i$, the forget gate $f$, the candidate $g$ and the output gate
# $o$, **in that order** (not the order of {eq}`eq-lstm-gates`). Return the new state
# `(h, c)` of {eq}`eq-lstm-cell` and {eq}`eq-lstm-hidden`, using only matrix products and
# elementwise functions (no `nn.LSTMCell`, no `torch.lstm_cell`, not the library's own
# `caption_lib.recurrent.lstm_cell`). The test compares your
# values and gradients with `nn.LSTMCell` and runs `torch.autograd.gradcheck`, which
# compares your gradients with finite differences. Then: what do the forget gate's values
# do to the gradient that flows from $c_t$ back to $c_{t-1}$?

# %% nbgrader={"grade": false, "grade_id": "ex1-solution", "locked": false, "schema_version": 3, "solution": true}
def lstm_step(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor,
              w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor):
    ### BEGIN SOLUTION
    gates = x @ w_ih.T + b_ih + h @ w_hh.T + b_hh  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)  # (B, H) each, nn.LSTMCell's order
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, H)
    h = torch.sigmoid(o) * torch.tanh(c)  # (B, H)
    return h, c
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex1-test", "locked": true, "points": 4, "schema_version": 3, "solution": false}
# visible: values and gradients against nn.LSTMCell on 2 random sizes; gradcheck in float64
checks.check_lstm_step(lstm_step, trials=2)
### BEGIN HIDDEN TESTS
# hidden: 20 more random sizes and weights; gradcheck with other inputs
checks.check_lstm_step(lstm_step, trials=20, seed=1)
### END HIDDEN TESTS
checks.passed("Exercise 1")

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 1.** $\partial c_t / \partial c_{t-1} = \mathrm{diag}(f_t)$: along the
# memory, the gradient is multiplied by the forget gate at each step and by no weight
# matrix, so with $f_t$ near 1 it survives many steps (the reason LSTMs train where plain
# RNNs' gradients vanish), and with $f_t$ near 0 the step forgets — the gradient too.
# The usual mistakes: the paper's gate order $(i, f, o, g)$ instead of PyTorch's
# $(i, f, g, o)$ (the check names it), returning $(c, h)$, $\tanh$ forgotten on $c_t$,
# and `.detach()` or in-place updates that break gradcheck.

# %% [markdown]
# **Exercise 2 (quick check).** Write `masked_xent(logits, captions, lengths)`: the mean
# cross-entropy of `logits` `(B, T, V)` against the targets `captions[:, 1:]` over the
# real tokens only (step $t$ of caption $b$ is real when $t <$ `lengths[b] - 1`). Do not
# use `caption_loss`. What would the loss be if you averaged over all $B \cdot T$
# positions instead, and why is that wrong?

# %% nbgrader={"grade": false, "grade_id": "ex2-solution", "locked": false, "schema_version": 3, "solution": true}
def masked_xent(logits: torch.Tensor, captions: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
    ### BEGIN SOLUTION
    T = logits.size(1)
    real = torch.arange(T).unsqueeze(0) < (lengths - 1).unsqueeze(1)  # (B, T)
    return F.cross_entropy(logits[real], captions[:, 1:T + 1][real])
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex2-test", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# visible: 3 random batches of captions of different lengths, against caption_loss (values and gradients)
checks.check_masked_xent(masked_xent, trials=3)
### BEGIN HIDDEN TESTS
# hidden: 20 more batches, vocabularies and lengths
checks.check_masked_xent(masked_xent, trials=20, seed=1)
### END HIDDEN TESTS
checks.passed("Exercise 2")

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 2.** Averaged over all $B \cdot T$ positions, the loss also counts the
# predictions at padded steps (of `<pad>` = 0, or of whatever garbage is there), and
# divides by more tokens than there are: its value then depends on how much padding the
# batch happens to have — on the other captions in the batch — and the model is trained
# to predict padding after `<end>`. Section *The loss* shows that the masked loss does
# not change with garbage in the padding.

# %% [markdown]
# **Hand in.** The last cell lists the exercises whose test cell ran to its end in this
# session. On Colab, run all cells, then hand in this notebook (*File → Download →
# .ipynb*) or a copy of that list; an instructor's grader also runs hidden tests.

# %%
checks.summary({"Exercise 1": 4, "Exercise 2": 2})
