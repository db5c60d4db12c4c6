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
# product, $\alpha_t^\top a$, which is the same sum; without autograd, as when decoding,
# it computes the scores a few rows at a time and the tanh as $2\sigma(2x) - 1$, the same
# function, which is faster on some CPUs: `Attention._scores_in_chunks`). The weights of
# each image sum to one:

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
# costs $B \cdot P \cdot E \cdot A$ multiply-adds (the cell below counts them for a batch
# of 32 at the book's sizes) — per word, if it is recomputed at every step (the way
# sgrvinod's PyTorch tutorial to image captioning, the best-known one, does it), for a
# caption of 20 words and again in the backward pass.

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

# %% [markdown]
# ## Exercises
#
# Exercise 1 is a task that needs thought: a second scoring function, written from its
# equation and compared with the additive one. Exercise 2 is a quick check. The test cells
# compare your code with a reference and say in one sentence what is wrong. The next cell
# imports what the exercises need, so this section also runs on its own (it is the
# chapter's nbgrader assignment: see *For instructors*).

# %%
# the exercises' imports
import torch
from torch import nn

from caption_lib import Attention, checks

# %% [markdown]
# **Exercise 1 (task).** Additive attention is not the only way to score a region.
# *Scaled dot-product* attention (Vaswani et al. 2017; Luong et al. 2015 without the
# scale) maps the region to a key and the state to a query in the same space of size $A$
# and scores their agreement,
#
# $$
# e_{ti} = \frac{(W_k a_i + b_k)^\top (W_q h_{t-1} + b_q)}{\sqrt{A}},
# $$
#
# followed by the same softmax {eq}`eq-att-softmax` and context {eq}`eq-att-context`.
# Write `forward` of `DotProductAttention` below (layers `key` = $W_k, b_k$ and
# `query` = $W_q, b_q$ are given) with the interface of `Attention`: `features (B, P, E)`,
# `hidden (B, H)`, an optional boolean `mask (B, P)` (`True` = a real region), returning
# `(context (B, E), alpha (B, P))`. No loop over regions: one batched product. Then think:
# which of the two has more parameters for the same $A$, which can score a region highly
# *whatever* the state, and why divide by $\sqrt{A}$? (Train it on the toy task above by
# replacing `Attention` in its loop, and compare.)

# %% nbgrader={"grade": false, "grade_id": "ex1-solution", "locked": false, "schema_version": 3, "solution": true}
class DotProductAttention(nn.Module):
    """Scaled dot-product attention with the interface of `caption_lib.Attention`."""

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.key = nn.Linear(encoder_dim, attention_dim)  # W_k a_i + b_k
        self.query = nn.Linear(decoder_dim, attention_dim)  # W_q h + b_q

    def forward(self, features: torch.Tensor, hidden: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ### BEGIN SOLUTION
        keys = self.key(features)  # (B, P, A)
        query = self.query(hidden).unsqueeze(2)  # (B, A, 1)
        scores = torch.bmm(keys, query).squeeze(2) / keys.size(2) ** 0.5  # (B, P)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(scores, dim=1)  # (B, P)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, E)
        return context, alpha
        ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex1-test", "locked": true, "points": 4, "schema_version": 3, "solution": false}
# visible: shapes, sums of alpha, the scale, values and gradients on 3 random inputs, with and without mask
checks.check_dot_attention(DotProductAttention, trials=3)
### BEGIN HIDDEN TESTS
# hidden: 20 more random inputs and masks, other weights
checks.check_dot_attention(DotProductAttention, trials=20, seed=1)
### END HIDDEN TESTS
checks.passed("Exercise 1")

# %% tags=["remove-cell", "instructors-key"]
# NBVAL_IGNORE_OUTPUT
# Key, exercise 1: both scoring functions on the toy task, same loop, same steps
def toy_run(att: nn.Module, seed: int = SEED) -> tuple[float, float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(att.parameters(), lr=0.02)
    for _ in range(TOY_STEPS):
        grid, query, target = colour_grids(64, g)
        _, alpha = att(grid, query)  # (64, 49)
        loss = -torch.log(alpha[torch.arange(64), target] + 1e-9).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        alpha = att(test_grid, test_query)[1]  # (256, 49)
    rows = torch.arange(len(test_target))
    return alpha[rows, test_target].mean().item(), (alpha.argmax(1) == test_target).float().mean().item()


for name, make in [("additive", Attention), ("dot-product", DotProductAttention)]:
    torch.manual_seed(SEED)
    att = make(3, 4, 16)
    weight, hit = toy_run(att)
    n_params = sum(p.numel() for p in att.parameters())
    print(f"{name:12s} {n_params:4d} parameters: weight on the right cell {weight:.3f}, "
          f"arg-max right {hit:.1%} after {TOY_STEPS} steps")

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 1.** The cell above trains both on the toy task with the same loop and
# prints what each reaches (and their parameter counts); on this task both learn to pick
# the cell, because a colour query only has to agree with one colour key. Additive
# attention has the extra vector $w$ and a nonlinearity: it can score a region highly
# for every state (through $W_a a_i$ alone), which a dot product can only do through the
# key's bias direction. Without the $1/\sqrt{A}$ scale the dot product of two random
# $A$-vectors has a standard deviation growing like $\sqrt{A}$, so with a large $A$ the
# softmax saturates at the start (one region gets all the weight, the gradients of the
# others vanish). Typical mistakes: the softmax over the batch, `masked_fill` with 0
# instead of $-\infty$ (masked regions still get weight), no scale.

# %% [markdown]
# **Exercise 2 (quick check).** Write `is_attention(alpha, mask=None, atol=1e-5)` that
# returns `True` when `alpha` `(B, P)` is a valid set of attention weights: no negative
# entries, every row sums to one (within `atol`), and — when a mask is given — exactly
# zero on the masked regions. In exact arithmetic a softmax weight is never 0 on an
# unmasked region; is that true of the library's float32 weights (try two scores that
# differ by 200)? Why does it not matter for this check?

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
# visible: weights of an Attention module with and without mask; rows that sum to 2
torch.manual_seed(0)
att = Attention(8, 5, 6)
f, h = torch.randn(3, 10, 8), torch.randn(3, 5)
m = torch.ones(3, 10, dtype=torch.bool)
m[:, 7:] = False
with torch.no_grad():
    checks.check_equal(is_attention(att(f, h)[1]), True, "is_attention(weights of Attention)")
    checks.check_equal(is_attention(att(f, h, mask=m)[1], m), True,
                       "is_attention(masked weights of Attention, mask)")
    checks.check_equal(is_attention(torch.full((3, 10), 0.2)), False,
                       "is_attention(rows that sum to 2)")
    ### BEGIN HIDDEN TESTS
    # hidden: unmasked weights under a mask, a negative weight, uniform weights
    checks.check_equal(is_attention(att(f, h)[1], m), False,
                       "is_attention(unmasked weights, mask)", "masked regions must get exactly 0")
    bad = att(f, h)[1].clone()
    bad[0, 0] += 0.5
    bad[0, 1] -= 0.5
    checks.check_equal(is_attention(bad), False, "is_attention(weights with a negative entry)")
    checks.check_equal(is_attention(torch.full((4, 8), 1 / 8)), True,
                       "is_attention(uniform weights)")
    ### END HIDDEN TESTS
checks.passed("Exercise 2")

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 2.** The softmax gives $\exp(e_{ti}) / \sum_k \exp(e_{tk})$, and
# $\exp$ of a finite score is positive, so in exact arithmetic an unmasked region always
# keeps some weight. In float32 it does not: $\exp(-200)$ is below the smallest float32
# (about $10^{-45}$), so a region scored 200 below the best gets a weight of exactly 0.
# It does not matter because a tiny weight contributes a tiny amount to the context, and keeping
# every weight positive keeps a gradient flowing to every region, so attention can still
# move there during training. Only $-\infty$ (the mask) guarantees an exact zero.

# %% [markdown]
# **Hand in.** The last cell lists the exercises whose test cell ran to its end in this
# session. On Colab, run all cells, then hand in this notebook (*File → Download →
# .ipynb*) or a copy of that list; an instructor's grader also runs hidden tests.

# %%
checks.summary({"Exercise 1": 4, "Exercise 2": 2})
