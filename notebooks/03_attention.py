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
# # Attention: where to look for each word
#
# **In this chapter you will learn**
#
# - the idea of *soft attention*: for every word, a probability distribution over the 49
#   image regions;
# - the three equations of additive ("Bahdanau") attention and the shape of every tensor
#   in them;
# - why the projection of the region features is computed **once per caption**, not once
#   per word, and what that saves;
# - how attention learns to pick a region, shown on a toy task and on a *shapes* image;
# - how a mask keeps attention off regions that do not exist (padding).

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
# Parameters: DATASET gives the image of the last section ("shapes" offline, "flickr8k"
# on Colab); the toy training below is small enough for a CPU
DATASET = "shapes"
SEED = 0
TOY_STEPS = 300

# %%
# NBVAL_IGNORE_OUTPUT
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import caption_lib
from caption_lib import Attention
from caption_lib.shapes import COLOURS, RGB

device = caption_lib.pick_device("auto")
caption_lib.seed_everything(SEED)
print(f"caption_lib {caption_lib.__version__} on {device}")

# %% [markdown]
# ## The idea
#
# The encoder (chapter 2) turned an image into $P = 49$ region vectors
# $a = \{a_1, \dots, a_P\}$, $a_i \in \mathbb{R}^E$, one per cell of a 7×7 grid. A decoder
# that squeezed them into one vector would have to remember everything about the image at
# once. Xu et al. {cite:p}`xu2015show` let the decoder *look* instead: before it writes
# word $t$, it decides how much each region matters for that word, a weight
# $\alpha_{ti} \ge 0$ with $\sum_i \alpha_{ti} = 1$. Writing "a big **red** circle", the
# weights should sit on the red object; writing "**left of**", perhaps on both objects.
# The decoder then sees the weighted average of the regions, the *context vector*
# $\hat z_t$.
#
# ## The equations
#
# How much region $i$ matters is scored by a small network $f_\text{att}$ of the region
# and of what the decoder has written so far, summarised by its previous hidden state
# $h_{t-1} \in \mathbb{R}^H$. The paper's equations (4), (5) and (13), with the *additive*
# scoring function of Bahdanau et al. {cite:p}`bahdanau2015neural`:
#
# $$
# e_{ti} = f_\text{att}(a_i, h_{t-1}) = w^\top \tanh\left(W_a a_i + W_h h_{t-1} + b\right)
# $$ (eq-att-score)
#
# $$
# \alpha_{ti} = \frac{\exp(e_{ti})}{\sum_{k=1}^{P} \exp(e_{tk})}
# $$ (eq-att-softmax)
#
# $$
# \hat z_t = \sum_{i=1}^{P} \alpha_{ti}\, a_i
# $$ (eq-att-context)
#
# $W_a \in \mathbb{R}^{A \times E}$ and $W_h \in \mathbb{R}^{A \times H}$ map a region and
# the state into a common *attention space* of size $A$, where they are added and squashed
# by $\tanh$; $w \in \mathbb{R}^A$ turns the result into one score. {eq}`eq-att-softmax`
# is a softmax over the regions, and {eq}`eq-att-context` is the paper's "deterministic
# soft attention": the expected region under $\alpha_t$. Everything is differentiable, so
# attention is learned by back-propagation with the rest of the model — nobody tells it
# where the objects are.
#
# In `caption_lib.Attention` the three matrices are `encoder_att` ($W_a$, whose bias is
# $b$), `decoder_att` ($W_h$) and `full_att` ($w$).

# %% [markdown]
# ## Every shape, step by step
#
# With the book's sizes: a batch of $B = 4$ images, $P = 49$ regions of $E = 2048$
# numbers, a decoder state of $H = 512$ and an attention space of $A = 512$.

# %%
B, P, E, H, A = 4, 49, 2048, 512, 512
torch.manual_seed(SEED)
attention = Attention(encoder_dim=E, decoder_dim=H, attention_dim=A)
features = torch.randn(B, P, E)  # the encoder's output a
hidden = torch.randn(B, H)  # the decoder's previous state h_{t-1}

projected = attention.project(features)  # W_a a_i + b for every region
query = attention.decoder_att(hidden).unsqueeze(1)  # W_h h_{t-1}, one per image
summed = torch.tanh(projected + query)  # broadcast over the P regions
scores = attention.full_att(summed).squeeze(2)  # e_ti, eq. (eq-att-score)
alpha = torch.softmax(scores, dim=1)  # eq. (eq-att-softmax)
context = (alpha.unsqueeze(2) * features).sum(dim=1)  # eq. (eq-att-context)

assert projected.shape == (B, P, A) and query.shape == (B, 1, A)
assert summed.shape == (B, P, A) and scores.shape == (B, P)
assert alpha.shape == (B, P) and context.shape == (B, E)

# %%
# NBVAL_CHECK_OUTPUT
for name, tensor in [("features a", features), ("hidden h", hidden),
                     ("projected W_a a", projected), ("query W_h h", query),
                     ("tanh(...)", summed), ("scores e", scores), ("alpha", alpha),
                     ("context z", context)]:
    print(f"{name:16s} {tuple(tensor.shape)}")

# %% [markdown]
# The module does exactly this in `forward` (it computes the context with a batched matrix
# product, $\alpha_t^\top a$, which is the same sum). The weights of each image sum to one:

# %%
# NBVAL_CHECK_OUTPUT
context_lib, alpha_lib = attention(features, hidden)
assert torch.allclose(alpha_lib, alpha, atol=1e-6)
assert torch.allclose(context_lib, context, atol=1e-5)
assert torch.allclose(alpha_lib.sum(dim=1), torch.ones(B))
print("alpha sums per image:", [round(s, 4) for s in alpha_lib.sum(dim=1).tolist()])
print("library == step by step:", torch.allclose(context_lib, context, atol=1e-5))

# %% [markdown]
# ## Project once per caption, not once per word
#
# Look at {eq}`eq-att-score` again: $W_a a_i$ does not depend on $t$. The regions are the
# same for every word of a caption, so their projection can be computed **once** and
# reused at each step; only $W_h h_{t-1}$ is new. That is why `Attention` has a separate
# `project` method and `forward` takes `projected=`. The saving is large: the projection
# costs $B \cdot P \cdot E \cdot A$ multiply-adds, 1.6 billion for a batch of 32 at the
# book's sizes — per word, if it is recomputed at every step (the way the best-known
# PyTorch tutorial does it), for a caption of 20 words and again in the backward pass.

# %%
# NBVAL_CHECK_OUTPUT
print(f"W_a a per step: {32 * P * E * A / 1e9:.2f} G multiply-adds for a batch of 32")
print(f"W_h h per step: {32 * H * A / 1e9:.4f} G multiply-adds")
projected = attention.project(features)
for t in range(3):  # three decoding steps share one projection
    hidden = torch.randn(B, H)
    once = attention(features, hidden, projected=projected)
    every_step = attention(features, hidden)  # projects again inside
    assert torch.allclose(once[0], every_step[0]) and torch.allclose(once[1], every_step[1])
print("same context and alpha with the projection reused: True")

# %%
# NBVAL_IGNORE_OUTPUT
batch_features, batch_hidden = torch.randn(32, P, E), torch.randn(32, H)  # a batch of 32


def time_steps(reuse: bool, steps: int = 20) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        proj = attention.project(batch_features) if reuse else None
        for _ in range(steps):
            attention(batch_features, batch_hidden, projected=proj)
    return (time.perf_counter() - start) * 1000


time_steps(True)  # warm-up
print(f"20 steps, batch 32, projection reused:     {time_steps(True):6.1f} ms")
print(f"20 steps, batch 32, projection every step: {time_steps(False):6.1f} ms")

# %% [markdown]
# (The decoder's benchmark, `benchmarks/bench_decoder.py`, measures a whole training step;
# chapter 4 reports it.)
#
# ## A toy task: find the region of a colour
#
# Does attention really learn to *choose*? Here is a task where it must. Every "image" is
# a 7×7 grid of region features that are simply colours (E = 3 numbers, red, green,
# blue): a dark, noisy background with the four colours of the *shapes* data set placed in
# four random cells. The decoder state $h$ is a one-hot code of a colour word (H = 4): the
# word the decoder is about to write. Attention is trained to put its weight on the cell
# of that colour, by minimising $-\log \alpha_{\text{target}}$. Nothing but the loss tells
# it which cell is which.

# %%
COLOUR_RGB = torch.tensor([RGB[c] for c in COLOURS], dtype=torch.float32) / 255  # (4, 3)


def colour_grids(batch: int, generator: torch.Generator):
    """Random 7x7 colour grids: features (batch, 49, 3), query (batch, 4), target (batch,)."""
    background = 0.1 + 0.15 * torch.rand(batch, 1, 1, generator=generator)  # grey level
    grid = background + 0.03 * torch.randn(batch, 49, 3, generator=generator)
    cells = torch.rand(batch, 49, generator=generator).argsort(dim=1)[:, :4]  # 4 cells
    cover = 0.4 + 0.6 * torch.rand(batch, 4, 1, generator=generator)  # partly covered cells
    rows = torch.arange(batch).unsqueeze(1)
    grid[rows, cells] = cover * COLOUR_RGB + (1 - cover) * grid[rows, cells]
    colour = torch.randint(0, 4, (batch,), generator=generator)  # the word
    query = F.one_hot(colour, 4).float()
    return grid, query, cells[torch.arange(batch), colour]


generator = torch.Generator().manual_seed(SEED)
torch.manual_seed(SEED)
toy = Attention(encoder_dim=3, decoder_dim=4, attention_dim=16)
optimizer = torch.optim.Adam(toy.parameters(), lr=0.02)
test_grid, test_query, test_target = colour_grids(256, torch.Generator().manual_seed(99))
rows = torch.arange(256)
with torch.no_grad():
    before = toy(test_grid, test_query)[1][rows, test_target].mean().item()
for step in range(TOY_STEPS):
    grid, query, target = colour_grids(64, generator)
    _, alpha = toy(grid, query)  # (64, 49)
    loss = -torch.log(alpha[torch.arange(64), target] + 1e-9).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
with torch.no_grad():
    after_alpha = toy(test_grid, test_query)[1]  # (256, 49)
after = after_alpha[rows, test_target].mean().item()
hit = (after_alpha.argmax(dim=1) == test_target).float().mean().item()
assert after > 0.8 and hit > 0.95

# %%
# NBVAL_CHECK_OUTPUT
print(f"weight on the right cell before training: {before:.2f} (uniform is 1/49 = {1 / 49:.2f})")
print(f"weight on the right cell after training > 0.8: {after > 0.8}")
print(f"arg-max on the right cell for > 95% of test grids: {hit > 0.95}")

# %%
# NBVAL_IGNORE_OUTPUT
print(f"after training: mean weight {after:.3f}, arg-max correct {hit:.1%}")

# %% [markdown]
# The weights of one test grid, for each of the four colour words: each query moves all
# the attention onto its own cell.

# %% mystnb={"image": {"alt": "A toy 7x7 grid of coloured cells and, for each of the four colour queries, the attention weights that pick out the cells of that colour"}}
fig, axes = plt.subplots(1, 5, figsize=(13, 2.8))
axes[0].imshow(test_grid[0].view(7, 7, 3).clamp(0, 1))
axes[0].set_title("the grid")
for k, colour in enumerate(COLOURS):
    with torch.no_grad():
        _, a = toy(test_grid[:1], F.one_hot(torch.tensor([k]), 4).float())
    axes[k + 1].imshow(a.view(7, 7), cmap="viridis", vmin=0, vmax=1)
    axes[k + 1].set_title(f'alpha for "{colour}"')
for ax in axes:
    ax.axis("off")
fig.suptitle("Toy attention after training: one query, one region")
plt.show()

# %% [markdown]
# ## Attention on an image
#
# The same trained toy attention, applied to a real image of the data set, resized to
# 224×224. Its regions are the 49 cells of the 7×7 grid, each described by its mean
# colour, arranged exactly like the encoder's regions in chapter 2 (`permute` then
# `reshape`):

# %%
# NBVAL_CHECK_OUTPUT
if DATASET == "shapes":
    data_dir = caption_lib.ensure_shapes()
else:
    data_dir = caption_lib.prepare_flickr8k()
val = caption_lib.split_records(caption_lib.load_dataset(data_dir), "val")
record = val[0]
pixels = np.asarray(caption_lib.load_image(record.image).resize((224, 224)), dtype=np.float32)
image = torch.from_numpy(pixels) / 255  # (224, 224, 3)
cells = F.avg_pool2d(image.permute(2, 0, 1).unsqueeze(0), 32)  # (1, 3, 7, 7)
regions = cells.permute(0, 2, 3, 1).reshape(1, 49, 3)  # (1, 49, 3)
assert cells.shape == (1, 3, 7, 7) and regions.shape == (1, 49, 3)
print(record.captions[0])
print(tuple(image.shape), "->", tuple(cells.shape), "->", tuple(regions.shape))

# %% mystnb={"image": {"alt": "A shapes image and, for each colour it contains, the attention of the toy model over the image: bright where the object of that colour is"}}
# the colours in the scene (shapes knows them); a photo has no such list: all four
words = sorted({o["colour"] for o in record.objects}) if record.objects else list(COLOURS)
fig, axes = plt.subplots(1, len(words) + 1, figsize=(4 * (len(words) + 1), 4))
axes[0].imshow(image)
axes[0].set_title(record.captions[0], fontsize=8)
for ax, word in zip(axes[1:], words):
    query = F.one_hot(torch.tensor([COLOURS.index(word)]), 4).float()
    with torch.no_grad():
        _, a = toy(regions, query)  # (1, 49)
    overlay = F.interpolate(a.view(1, 1, 7, 7), size=224, mode="nearest")[0, 0]
    ax.imshow(image)
    ax.imshow(overlay, cmap="gray", alpha=0.7, vmin=0, vmax=overlay.max().item())
    for k in range(1, 7):
        ax.axhline(32 * k, color="white", lw=0.3)
        ax.axvline(32 * k, color="white", lw=0.3)
    ax.set_title(f'where the word "{word}" looks')
for ax in axes:
    ax.axis("off")
fig.suptitle("Attention weights on the 7x7 grid (bright = high alpha)")
plt.show()

# %% [markdown]
# The toy never saw this image, nor a whole object — only single coloured cells — and yet
# on a shapes image, for each colour word it looks at the object of that colour, on the
# cells the object fills (the cells an object only partly covers get less). On a photo
# (Flickr8k) it looks at the cells whose mean colour is nearest that word's, whatever
# object they belong to: four colours are all it knows. In the real model the regions are 2048-number ResNet features and the
# query is the LSTM's state, but the mechanism is this one. Chapter 6 draws the same kind
# of picture for every word of a generated caption.
#
# ## Masking regions that do not exist
#
# Sometimes a batch holds images with different numbers of regions (different grid sizes,
# or images padded to a common size), or some regions must be ignored. A boolean `mask`
# of shape `(B, P)` (`True` = a real region) sets the score of every masked region to
# $-\infty$ before the softmax, so its weight is exactly $\exp(-\infty) = 0$ and the
# others still sum to one. (Every image needs at least one real region.)

# %%
# NBVAL_CHECK_OUTPUT
features = torch.randn(2, 6, E)
hidden = torch.randn(2, H)
mask = torch.tensor([[True, True, True, True, False, False],   # 4 real regions
                     [True, True, True, True, True, True]])    # 6 real regions
_, alpha = attention(features, hidden, mask=mask)
assert torch.equal(alpha[~mask], torch.zeros(2))
assert torch.allclose(alpha.sum(dim=1), torch.ones(2))
print("masked weights:", alpha[~mask].tolist())
print("sums:", [round(s, 4) for s in alpha.sum(dim=1).tolist()])

# %% [markdown]
# ## Summary
#
# - Soft attention gives each word a distribution $\alpha_t$ over the $P$ regions
#   ({eq}`eq-att-softmax`) and feeds the decoder their weighted average $\hat z_t$
#   ({eq}`eq-att-context`).
# - Additive attention scores a region by $w^\top \tanh(W_a a_i + W_h h_{t-1} + b)$
#   ({eq}`eq-att-score`); shapes: `(B, P, E)` regions and `(B, H)` state give a
#   `(B, P, A)` sum, `(B, P)` scores and weights, and a `(B, E)` context.
# - $W_a a_i$ is the same at every step: `Attention.project` computes it once per caption.
# - Attention learns where to look from the loss alone (the toy task); a mask gives
#   non-existent regions a weight of exactly zero.
#
# ## Exercises
#
# **Exercise 1.** Implement the forward pass of additive attention with the layers of an
# `Attention` module `att` ({eq}`eq-att-score` to {eq}`eq-att-context`), including the
# reuse of `projected` and the optional `mask`. Return `(context, alpha)`.

# %% nbgrader={"grade": false, "grade_id": "ex1-solution", "locked": false, "schema_version": 3, "solution": true}
def attention_forward(att: Attention, features: torch.Tensor, hidden: torch.Tensor,
                      projected: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    ### BEGIN SOLUTION
    if projected is None:
        projected = att.encoder_att(features)
    scores = att.full_att(torch.tanh(projected + att.decoder_att(hidden).unsqueeze(1)))
    scores = scores.squeeze(2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    alpha = torch.softmax(scores, dim=1)
    context = (alpha.unsqueeze(2) * features).sum(dim=1)
    return context, alpha
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex1-test", "locked": true, "points": 2, "schema_version": 3, "solution": false}
att = Attention(8, 5, 6)
f, h = torch.randn(3, 10, 8), torch.randn(3, 5)
for mine, ref in zip(attention_forward(att, f, h), att(f, h)):
    assert mine.shape == ref.shape and torch.allclose(mine, ref, atol=1e-6)
### BEGIN HIDDEN TESTS
for seed in range(5):
    g = torch.Generator().manual_seed(seed)
    att = Attention(7, 4, 9)
    f, h = torch.randn(2, 12, 7, generator=g), torch.randn(2, 4, generator=g)
    m = torch.rand(2, 12, generator=g) > 0.4
    m[:, 0] = True
    p = att.project(f)
    for args in [dict(), dict(projected=p), dict(mask=m), dict(projected=p, mask=m)]:
        for mine, ref in zip(attention_forward(att, f, h, **args), att(f, h, **args)):
            assert torch.allclose(mine, ref, atol=1e-6), args
### END HIDDEN TESTS
print("Exercise 1: correct")

# %% [markdown]
# **Exercise 2.** Write `is_attention(alpha, mask=None, atol=1e-5)` that returns `True`
# when `alpha` `(B, P)` is a valid set of attention weights: no negative entries, every
# row sums to one (within `atol`), and — when a mask is given — exactly zero on the masked
# regions. Why can the library's weights never be exactly 0 on an unmasked region, and
# why does that not matter?

# %% nbgrader={"grade": false, "grade_id": "ex2-solution", "locked": false, "schema_version": 3, "solution": true}
def is_attention(alpha: torch.Tensor, mask: torch.Tensor | None = None,
                 atol: float = 1e-5) -> bool:
    ### BEGIN SOLUTION
    if (alpha < 0).any():
        return False
    if not torch.allclose(alpha.sum(dim=1), torch.ones(alpha.size(0), dtype=alpha.dtype),
                          atol=atol):
        return False
    return mask is None or bool((alpha[~mask] == 0).all())
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex2-test", "locked": true, "points": 2, "schema_version": 3, "solution": false}
att = Attention(8, 5, 6)
f, h = torch.randn(3, 10, 8), torch.randn(3, 5)
m = torch.ones(3, 10, dtype=torch.bool)
m[:, 7:] = False
assert is_attention(att(f, h)[1]) and is_attention(att(f, h, mask=m)[1], m)
assert not is_attention(torch.full((3, 10), 0.2))
### BEGIN HIDDEN TESTS
assert not is_attention(att(f, h)[1], m), "unmasked weights on masked regions"
bad = att(f, h)[1].clone()
bad[0, 0] += 0.5
bad[0, 1] -= 0.5
assert not is_attention(bad), "negative weight"
assert is_attention(torch.full((4, 8), 1 / 8))
### END HIDDEN TESTS
print("Exercise 2: correct")
