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
# # Dataset: images, captions and a vocabulary
#
# **In this chapter you will learn**
#
# - what an image captioning data set is made of, and the three formats Flickr8k comes in;
# - why the book ships its own small data set, *shapes*, and what it lets us measure;
# - why data sets are split by image, not by caption;
# - how captions become sequences of integers (a *vocabulary*) and batches of them;
# - what happens when the input is wrong.

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
# Parameters: "shapes" runs offline on a CPU; "flickr8k" downloads Flickr8k (Colab; the
# archives' published size is about 1 GB)
DATASET = "shapes"
SEED = 0

# %%
# NBVAL_IGNORE_OUTPUT
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

import caption_lib
from caption_lib import (
    CaptionDataset,
    Vocabulary,
    checks,
    collate_captions,
    load_dataset,
    object_cell_mask,
    parse_mentions,
    read_annotations,
    split_records,
    tokenize,
)

device = caption_lib.pick_device("auto")  # a GPU on Colab, the CPU here
generator = caption_lib.seed_everything(SEED)
print(f"caption_lib {caption_lib.__version__} on {device}")

# %% [markdown]
# ## What a caption data set is
#
# A captioning data set is a list of $N$ images, each with $K$ reference captions written
# by people (Flickr8k {cite:p}`hodosh2013framing`: 8,000 images, $K = 5$):
#
# $$
# \mathcal{D} = \big\{ (I_n, \{ y^{(n,1)}, \dots, y^{(n,K)} \}) \big\}_{n=1}^{N},
# \qquad y = (y_1, \dots, y_C), \; y_t \in \{1, \dots, V\}.
# $$ (eq-dataset)
#
# Each caption is a sequence of $C$ words from a vocabulary of $V$ words. Show, Attend and
# Tell {cite:p}`xu2015show` learns $p(y \mid I) = \prod_t p(y_t \mid y_{<t}, I)$ by
# maximising the likelihood of *every* reference caption of every training image, so the
# training set has $NK$ examples (one per caption), while evaluation generates one caption
# per image and compares it with all $K$ references.
#
# Several different captions per image is not noise: there are many correct ways to say
# what is in a picture, and metrics such as BLEU reward a caption that agrees with *any* of
# the references.
#
# ## Three formats, one `Record`
#
# Flickr8k is distributed in three ways, and `caption_lib` reads all of them into the same
# `Record(image, captions, split, image_id)`. Let us write a tiny example of each into a
# temporary folder and read it back.

# %%
# NBVAL_CHECK_OUTPUT
tmp = Path(tempfile.mkdtemp())

# 1. Karpathy's JSON (used by most papers, also for Flickr30k and COCO)
(tmp / "karpathy").mkdir()
(tmp / "karpathy" / "dataset_flickr8k.json").write_text("""{"images": [
  {"filename": "1000_a.jpg", "split": "train", "sentences": [
     {"raw": "A child climbs the stairs .", "tokens": ["a", "child", "climbs", "the", "stairs"]},
     {"raw": "A girl in pink , indoors", "tokens": ["a", "girl", "in", "pink", "indoors"]}]},
  {"filename": "2000_b.jpg", "split": "test", "sentences": [
     {"raw": "Two dogs play in the snow .", "tokens": ["two", "dogs", "play", "in", "the", "snow"]}]}
]}""")

# 2. The original release: a token file plus one split list per split (dev = val)
(tmp / "flickr").mkdir()
(tmp / "flickr" / "Flickr8k.token.txt").write_text(
    "1000_a.jpg#0\tA child climbs the stairs .\n"
    "1000_a.jpg#1\tA girl in pink , indoors\n"
    "2000_b.jpg#0\tTwo dogs play in the snow .\n")
(tmp / "flickr" / "Flickr_8k.trainImages.txt").write_text("1000_a.jpg\n")
(tmp / "flickr" / "Flickr_8k.devImages.txt").write_text("")
(tmp / "flickr" / "Flickr_8k.testImages.txt").write_text("2000_b.jpg\n")

# 3. Kaggle's captions.txt: CSV, so a caption with a comma is quoted
(tmp / "kaggle").mkdir()
(tmp / "kaggle" / "captions.txt").write_text(
    "image,caption\n"
    "1000_a.jpg,A child climbs the stairs .\n"
    '1000_a.jpg,"A girl in pink , indoors"\n'
    "2000_b.jpg,Two dogs play in the snow .\n")

for annotations in ["karpathy/dataset_flickr8k.json", "flickr/Flickr8k.token.txt",
                    "kaggle/captions.txt"]:
    print(annotations)
    for r in read_annotations(tmp / annotations):
        print(f"  {r.image_id}  {r.split:5s}  {r.captions}")

# %% [markdown]
# The three agree, except for one thing: `captions.txt` has no splits. Without the official
# split lists next to it, `caption_lib` assigns each image to a split from a hash of its
# file name (75% / 12.5% / 12.5%, Flickr8k's proportions), which is why `2000_b.jpg` lands
# where its hash says. Karpathy's JSON also knows a fourth split, `restval` (COCO images
# that are neither val nor test); it is folded into `train` unless you ask otherwise.
#
# ## The data set of this book: *shapes*
#
# Offline there is no Flickr8k, so the book ships a generator: 224×224 images with 1–3
# coloured shapes and five captions each, written in Karpathy's format (one code path for
# both). The parameter cell chooses: `"shapes"` generates it once into the workspace and
# reuses it (the cell below prints how long it took this time); `"flickr8k"` downloads the
# real data (Colab).

# %%
# NBVAL_IGNORE_OUTPUT
start = time.perf_counter()
if DATASET == "shapes":
    data_dir = caption_lib.ensure_shapes()  # 3000 / 300 / 300 images, generated once
else:
    from caption_lib.download import prepare_flickr8k

    data_dir = prepare_flickr8k()  # the images, the token file and Karpathy's split
records = load_dataset(data_dir)
print(f"{len(records)} images from {data_dir.name} in {time.perf_counter() - start:.1f} s")

# %%
# NBVAL_CHECK_OUTPUT
first = records[0]
print(first.image.name, first.split)
for caption in first.captions:
    print(" ", caption)
for obj in first.objects or []:
    print(" ", obj)

# %% [markdown]
# Every image of *shapes* also carries its **ground truth**: for each object its shape, colour, size
# and box `[x0, y0, x1, y1]` in pixels. Real data sets have nothing like it; here it lets
# later chapters *measure* whether a caption names the right objects and whether the
# model looked at the right place.

# %% mystnb={"image": {"alt": "Eight shapes images, each titled with its first reference caption"}}
fig, axes = plt.subplots(2, 4, figsize=(13, 7))
for ax, r in zip(axes.flat, records[:8]):
    ax.imshow(caption_lib.load_image(r.image))
    ax.set_title(textwrap.fill(r.captions[0], 34), fontsize=8)
    ax.axis("off")
fig.suptitle("Eight images of the data set with their first reference caption")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### How the shapes are made, and why
#
# The generator (`caption_lib/shapes.py`) is designed so that a small attention model can
# learn it on a CPU in minutes, and so that the captions can be *checked*:
#
# | choice | value | why |
# |---|---|---|
# | objects | 1–3, not overlapping, 6 px apart | counting and relations, each object visible whole |
# | attributes | 4 colours × 3 shapes × 2 sizes | colour is easy for a CNN, shape harder, size in between |
# | sizes | boxes of 64 / 96 px a side (`HALF_SIZE` in `shapes.py`): 2–3 / 3–4 cells of the 7×7 grid a side, depending on where the box falls | a random-init ResNet recognises shape better on big objects |
# | noise | shaded background, jittered colours, ±3 grey levels per pixel | no two images alike |
# | references | 5 per image, ≤ 18 tokens, 32 words | a grammar small enough to learn |
# | canonical caption | always reference 1: objects left to right, neighbours related | one most likely caption to learn: the offline recipe trains on it alone (`references = "first"`, chapter 5) and keeps the others as references to score against |
# | variants | a list with *and*, *there are two shapes ...*, no sizes, *a picture of ...*, right to left | variety, as in real references |
# | every reference | names each object as *a [size] colour shape* | the (colour, shape) pairs can be parsed back |
#
# The relation between two neighbours is *left of* when they are further apart
# horizontally than vertically, otherwise *above* or *below*. `parse_mentions` inverts the
# grammar: a shape word right after a colour word is one mention. It returns exactly the
# scene's objects for every reference (a test checks this for every generated caption):

# %%
# NBVAL_CHECK_OUTPUT
for r in records[:3]:
    if r.objects is None:  # real data sets have no ground truth
        break
    scene = Counter((o["colour"], o["shape"]) for o in r.objects)
    assert all(Counter(parse_mentions(c)) == scene for c in r.captions)
    print(r.captions[0], "->", parse_mentions(r.captions[0]))

# %% [markdown]
# The encoder of the next chapter sees the image as a 7×7 grid of regions, each 32×32
# pixels. `object_cell_mask` gives the cells an object's box overlaps, in the same
# row-major order as the encoder's 49 regions; chapter 6 uses it to score where the
# attention looks.

# %%
# NBVAL_CHECK_OUTPUT
box = first.objects[0]["box"] if first.objects else [40, 70, 104, 134]
mask = object_cell_mask(box)  # (7, 7) bool
assert mask.shape == (7, 7) and mask.flatten().shape == (49,)
print(box)
print(mask.int())

# %% mystnb={"image": {"alt": "One shapes image under a grey mask marking the 32-pixel grid cells its first object covers"}}
fig, ax = plt.subplots(figsize=(4, 4))
ax.imshow(caption_lib.load_image(first.image).resize((224, 224)))
ax.imshow(mask.float().numpy(), extent=(0, 224, 224, 0), cmap="gray", alpha=0.45,
          interpolation="nearest")
for k in range(8):
    ax.axhline(32 * k, color="white", lw=0.5)
    ax.axvline(32 * k, color="white", lw=0.5)
ax.set_title("object 1 and the grid cells it covers")
ax.axis("off")
plt.show()

# %% [markdown]
# ## Statistics: lengths, words and splits
#
# `caption_lib.summarize` (also `caption-lib inspect DATA --json` on the command line)
# counts images, captions, splits, the vocabulary size, caption lengths and missing image
# files.

# %%
# NBVAL_CHECK_OUTPUT
info = caption_lib.summarize(records)
for key, value in info.items():
    print(f"{key:15s} {value}")
assert info["missing_images"] == 0

# %% mystnb={"image": {"alt": "Histograms of caption length in words and of the most frequent training words"}}
lengths = [len(tokenize(c)) for r in records for c in r.captions]
counts = Counter(t for r in split_records(records, "train") for c in r.captions
                 for t in tokenize(c))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
ax1.hist(lengths, bins=range(min(lengths), max(lengths) + 2), align="left", rwidth=0.85)
ax1.set(title="Caption length", xlabel="words", ylabel="captions")
top = counts.most_common(20)
ax2.bar([w for w, _ in top], [n for _, n in top])
ax2.set(title="The 20 most frequent words (train)", ylabel="count")
ax2.tick_params(axis="x", rotation=70)
plt.tight_layout()
plt.show()

# %% [markdown]
# On shapes the lengths cluster by the number of objects (3–8 words for one object, up to
# 18 for three); people's captions vary more. Real captions have a long tail of rare
# words (Zipf's law): in Flickr8k a large share of the distinct words occur only once or
# twice, too rarely to learn, which is why a `min_freq` threshold maps the rarest words to
# `<unk>` (the shapes grammar has no rare words, so the book's recipe keeps them all).
#
# **Why split images, not captions?** The five references of an image describe the same
# scene. If captions were split at random, most test images would also be training images
# (under other captions), and test scores would measure memory, not generalisation. The
# splits are therefore sets of images:

# %%
# NBVAL_CHECK_OUTPUT
by_split = {s: {r.image_id for r in split_records(records, s)} for s in ("train", "val", "test")}
assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
print({s: len(ids) for s, ids in by_split.items()})
# what a caption-level random split would do: 10% of the captions as "test"
pairs = [(r.image_id, c) for r in records for c in r.captions]
rng = np.random.default_rng(SEED)
test_mask = rng.random(len(pairs)) < 0.1
train_images = {img for (img, _), t in zip(pairs, test_mask) if not t}
leaked = np.mean([img in train_images for (img, _), t in zip(pairs, test_mask) if t])
print(f"caption-level split: {leaked:.0%} of test captions have their image in training")

# %% [markdown]
# ## The vocabulary
#
# A network reads numbers, not words. `tokenize` lower-cases a caption and splits it with
# nltk's `TreebankWordTokenizer` (regular expressions only: it works offline, unlike
# `word_tokenize`, which needs a downloaded model), dropping punctuation. The
# `Vocabulary` is built **from the training captions only** and numbers the words:
#
# $$
# \text{encode}(w_1 \dots w_n) = (\texttt{<start>}, s(w_1), \dots, s(w_n), \texttt{<end>}),
# \qquad
# s(w) = \begin{cases} \text{index of } w & \text{if } \text{count}(w) \ge \text{min\_freq} \\
# \text{index of } \texttt{<unk>} & \text{otherwise} \end{cases}
# $$ (eq-encode)
#
# so a caption of $n$ words has length $L = n + 2$. Four special tokens come first:
# `<pad>` = 0 fills short captions in a batch, `<start>` is the decoder's first input,
# `<end>` is what it emits to stop, `<unk>` stands for every rare or unseen word.

# %%
# NBVAL_CHECK_OUTPUT
train = split_records(records, "train")
vocab = Vocabulary.build((c for r in train for c in r.captions), min_freq=1)
print(vocab)
print(vocab.itos[:12])
print("pad, start, end, unk =", vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id)
assert vocab.pad_id == 0 and len(vocab) == info["vocab_size"]

# %%
# NBVAL_CHECK_OUTPUT
text = "A big red circle, left of a small PURPLE square."
ids = vocab.encode(text)
print(tokenize(text))
print(ids)
print(vocab.decode_tokens(ids))
print(repr(vocab.decode(ids + [vocab.pad_id, vocab.pad_id])))
print("not in the training captions, so <unk>:", [w for w in tokenize(text) if w not in vocab])
assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id and len(ids) == len(tokenize(text)) + 2
# every word of a training caption is in the vocabulary (min_freq=1): decoding gives it back
assert vocab.decode(vocab.encode(train[0].captions[0])) == " ".join(tokenize(train[0].captions[0]))

# %% [markdown]
# Words the training captions never use became `<unk>` (index 3), as the last line lists
# (on shapes: *purple*, not a colour of the data set); `decode` stops at `<end>` and drops
# `<pad>`/`<start>`. The vocabulary is saved as JSON next to every
# trained model (`vocab.save(path)` / `Vocabulary.load(path)`), so a checkpoint decodes
# with exactly the words it was trained with.
#
# ## From records to batches
#
# The plain way to feed a captioner is one item per *caption* (`CaptionDataset`: each
# image appears once per reference, as an image tensor and its token ids). Captions differ
# in length, so `collate_captions` pads a batch with `<pad>` to the longest and returns the
# lengths; the loss of chapter 4 ignores the padded positions. The book's trainer
# (chapter 5) batches the same captions differently: it never loads an image, but reads
# the encoder's cached output (chapter 2) and groups the captions by *image*, so a batch
# of images brings some of their captions (`captions_per_image`, or with
# `references = "first"` the first one only) and the encoder runs once per image;
# evaluation generates one caption per image and compares it with all its references.

# %%
# NBVAL_CHECK_OUTPUT
to_tensor = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])
dataset = CaptionDataset(train, vocab, to_tensor)
loader = DataLoader(dataset, batch_size=4, shuffle=False, collate_fn=collate_captions)
x, captions, lengths, index = next(iter(loader))
# one item per caption the reader kept (it drops empty and repeated ones, see below)
assert len(dataset) == sum(len(r.captions) for r in train)
print(f"{len(train)} training images, {len(dataset)} captions: one item per caption")
assert x.shape == (4, 3, 224, 224) and captions.shape == (4, int(lengths.max()))
print("images  ", tuple(x.shape), x.dtype)  # (B, 3, 224, 224)
print("captions", tuple(captions.shape), captions.dtype)  # (B, L) padded with 0
print("lengths ", lengths.tolist())
print(captions)

# %% [markdown]
# ## When the input is wrong
#
# Real annotation files are messy. `caption_lib` either stops with one line naming the
# file and line, or skips and counts (a warning says how many; `inspect` prints them):
#
# | problem | what happens |
# |---|---|
# | unknown format, malformed JSON / line / CSV row, non-UTF-8 file | error (file:line) |
# | unknown split name; an image in two split lists | error (file:line) |
# | duplicate image (JSON) or duplicate `IMAGE#N` (token file) | error (file:line) |
# | empty or whitespace-only caption | skipped, counted |
# | the same caption twice for one image | skipped, counted |
# | an image left without captions; a Flickr8k image in no split list | skipped, counted |
# | missing image file | counted by `inspect`; error when loaded |
# | corrupt, truncated or zero-byte image; decompression bomb | error naming the file |
# | grayscale, RGBA, CMYK, palette or 16-bit image | converted to RGB |

# %%
# NBVAL_CHECK_OUTPUT
(tmp / "bad").mkdir()
(tmp / "bad" / "Flickr8k.token.txt").write_text("1000_a.jpg#0\tA dog .\n1000_a.jpg A cat\n")
try:
    read_annotations(tmp / "bad" / "Flickr8k.token.txt")
except caption_lib.CaptionLibError as err:
    print(str(err).replace(str(tmp), "TMP"))

# %% [markdown]
# ## Summary
#
# - A caption data set pairs each image with several references; splits are made over
#   images so that no test image is seen in training.
# - Karpathy's JSON, the Flickr8k token file and Kaggle's `captions.txt` all become the
#   same `Record`s; bad input is an error naming file and line, or a counted skip.
# - The *shapes* data set is generated offline in about half a minute, deterministically,
#   with a small grammar whose (colour, shape) mentions can be parsed back, and with boxes
#   that map onto the encoder's 7×7 grid.
# - The `Vocabulary` (from training captions only) turns a caption into
#   `<start> ... <end>` indices, `<pad>` = 0, rare words `<unk>`; batches are padded and
#   carry their lengths.

# %% [markdown]
# ## Exercises
#
# Exercises 1 and 2 are quick checks of this chapter's ideas; exercise 3 is a task that
# needs some thought (where exactly does a box end?). The test cell below each exercise
# compares your function with the library's on many inputs and, when they disagree, says
# what is wrong in one sentence. The cell just below imports what the exercises need, so
# this section also runs on its own (it is the chapter's nbgrader assignment: see *For
# instructors*).

# %%
# the exercises' imports and data: a small shapes set of their own (a few seconds)
import tempfile
from collections import Counter
from pathlib import Path

import torch

from caption_lib import Vocabulary, checks, load_dataset, make_shapes, split_records, tokenize

exercise_data = make_shapes(Path(tempfile.mkdtemp()) / "shapes", n_train=100, n_val=0, n_test=0,
                            progress=False)
exercise_train = split_records(load_dataset(exercise_data), "train")
exercise_vocab = Vocabulary.build([c for r in exercise_train for c in r.captions])

# %% [markdown]
# **Exercise 1 (quick check).** Write `encode(text, stoi)` that turns a caption into
# indices as in {eq}`eq-encode`: `tokenize` it, map each word through the dictionary
# `stoi` (unknown words to `stoi["<unk>"]`), and add `<start>` and `<end>`.

# %% nbgrader={"grade": false, "grade_id": "ex1-solution", "locked": false, "schema_version": 3, "solution": true}
def encode(text: str, stoi: dict[str, int]) -> list[int]:
    ### BEGIN SOLUTION
    words = [stoi.get(w, stoi["<unk>"]) for w in tokenize(text)]
    return [stoi["<start>"]] + words + [stoi["<end>"]]
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex1-test", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# visible: two captions, one with an unknown word, against Vocabulary.encode
checks.check_encode(encode, exercise_vocab, trials=0, texts=["a red circle", "a mauve circle"])
### BEGIN HIDDEN TESTS
# hidden: 200 random word sequences with unknown words, capitals, punctuation; the empty caption
checks.check_encode(encode, exercise_vocab, trials=200, seed=1,
                    texts=["A big red circle, left of a small PURPLE square.", ""])
### END HIDDEN TESTS
checks.passed("Exercise 1")

# %% [markdown]
# **Exercise 2 (quick check).** Write `build_itos(captions, min_freq)` returning the
# vocabulary's word list: the four special tokens `<pad> <start> <end> <unk>`, then every
# word seen at least `min_freq` times in `captions`, most frequent first, ties in
# alphabetical order. Why are ties broken at all?

# %% nbgrader={"grade": false, "grade_id": "ex2-solution", "locked": false, "schema_version": 3, "solution": true}
def build_itos(captions: list[str], min_freq: int = 1) -> list[str]:
    ### BEGIN SOLUTION
    counts = Counter(w for c in captions for w in tokenize(c))
    words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
    return ["<pad>", "<start>", "<end>", "<unk>"] + words
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex2-test", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# visible: a three-caption toy set at min_freq 2 and 1, against Vocabulary.build
def reference_itos(captions, min_freq):
    return Vocabulary.build(captions, min_freq).itos


toy = ["a dog runs", "a dog sits", "a cat"]
checks.check_equal(build_itos(toy, 2), ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"],
                   "build_itos(toy, min_freq=2)", "special tokens first, then words seen twice")
checks.check_function(build_itos, reference_itos, lambda g: (toy, 1), trials=1)
### BEGIN HIDDEN TESTS
# hidden: the captions of 100 generated images at four random min_freq in 1-59
sample = [c for r in exercise_train for c in r.captions]
checks.check_function(build_itos, reference_itos, trials=4, seed=1,
                      make_inputs=lambda g: (sample, int(torch.randint(1, 60, (1,), generator=g))))
### END HIDDEN TESTS
checks.passed("Exercise 2")

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 2.** Without a rule for ties, words of equal count would come in
# whatever order the counter yields them (the order of first appearance), so the same
# words could get different ids from a reordered data set, and a saved model's vocabulary
# could not be rebuilt exactly. Sorting by (count, word) makes the ids a function of the
# counts alone.

# %% [markdown]
# **Exercise 3 (task).** Write `cell_mask(box, grid=7, image_size=224)` returning the
# `(grid, grid)` boolean tensor of the cells a box `[x0, y0, x1, y1]` overlaps, like
# `object_cell_mask`. Pixels are half-open: the box covers `x0 <= x < x1` and
# `y0 <= y < y1`; cell `(row, column)` covers the pixels of its `image_size / grid` square.
# Work out the boundary cases before you write code: which cells does
# `[100, 100, 130, 130]` cover, and which does `[64, 64, 96, 96]`? Row is `y`, column `x`.

# %% nbgrader={"grade": false, "grade_id": "ex3-solution", "locked": false, "schema_version": 3, "solution": true}
def cell_mask(box, grid: int = 7, image_size: int = 224) -> torch.Tensor:
    ### BEGIN SOLUTION
    x0, y0, x1, y1 = box
    cell = image_size / grid
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    rows = [r for r in range(grid) if y0 < (r + 1) * cell and y1 > r * cell]
    cols = [c for c in range(grid) if x0 < (c + 1) * cell and x1 > c * cell]
    for r in rows:
        mask[r, cols] = True
    return mask
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex3-test", "locked": true, "points": 4, "schema_version": 3, "solution": false}
# visible: one box (4 cells); 20 random boxes against object_cell_mask
checks.check_equal(cell_mask([100, 100, 130, 130]).nonzero().tolist(),
                   [[3, 3], [3, 4], [4, 3], [4, 4]], "cells of [100, 100, 130, 130] (row, column)")
checks.check_cell_mask(cell_mask, trials=20)
### BEGIN HIDDEN TESTS
# hidden: 300 random boxes, the whole image, boxes ending exactly on a cell border, a 2-pixel box on a corner
checks.check_cell_mask(cell_mask, trials=300, seed=2,
                       boxes=[[0, 0, 224, 224], [64, 64, 96, 96], [31, 31, 33, 33], [0, 0, 1, 1]])
### END HIDDEN TESTS
checks.passed("Exercise 3")

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 3.** Cells are 32 pixels wide. `[100, 100, 130, 130]` covers pixels
# 100–129, that is columns and rows 3 (96–127) and 4 (128–159): the four cells (3, 3),
# (3, 4), (4, 3), (4, 4). `[64, 64, 96, 96]` covers pixels 64–95 only: the single cell
# (2, 2) — pixel 96, where cell 3 starts, is outside the box. The usual mistakes are
# treating `x1` as inclusive (one cell too many on every border) and using `<=` on one of
# the two comparisons.

# %% [markdown]
# **Hand in.** The last cell lists the exercises whose test cell ran to its end in this
# session. On Colab, run all cells, then hand in this notebook (*File → Download →
# .ipynb*) or a copy of that list; an instructor's grader also runs hidden tests.

# %%
checks.summary({"Exercise 1": 2, "Exercise 2": 2, "Exercise 3": 4})
