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
# # Inference: beam search, evaluation and attention you can see
#
# **In this chapter you will learn**
#
# - how a trained decoder writes a caption without a reference to lean on: greedy
#   decoding, and why *beam search* finds more probable captions;
# - why beam search ranks finished captions by a length-normalised score;
# - how captions are scored: BLEU, CIDEr, ROUGE-L and METEOR over the whole test split,
#   with beam sizes 1, 3 and 5;
# - two measures only a data set with ground truth allows: *semantic F1* (does the caption
#   name what is in the picture?) and *attention grounding* (does the model look at the
#   object while it names it?);
# - where the model fails, and how to caption your own images (in Python and with the
#   `caption-lib caption` command).

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
# Parameters: "shapes" runs offline on a CPU; "flickr8k" needs Colab (a GPU, a download)
DATASET = "shapes"
SEED = 0
BEAM_SIZES = (1, 3, 5)  # the evaluation table
BEAM_SIZE = 3  # the book's choice for everything else
# A published trained model instead of the run of chapter 5: its address and SHA-256
# (both from whoever published it); None trains, or finds, the chapter 5 run
CHECKPOINT_URL = None
CHECKPOINT_SHA256 = None

# %%
# NBVAL_IGNORE_OUTPUT
import json
import tempfile
import time
from pathlib import Path

import torch
from IPython.display import Markdown, display
from PIL import Image

import caption_lib
from caption_lib import (
    Captioner,
    beam_search,
    caption_image,
    checks,
    greedy_decode,
    load_dataset,
    make_shapes,
    object_cell_mask,
    parse_mentions,
    plot_attention,
    show_grid,
    split_records,
    tokenize,
)
from caption_lib.decoding import decode_batch
from caption_lib.evaluate import evaluate
from caption_lib.features import cached_features
from caption_lib.metrics import bleu, grounding_report, semantic_f1
from caption_lib.train import ensure_trained, recipe

device = caption_lib.pick_device("auto")  # a GPU on Colab, the CPU here
caption_lib.seed_everything(SEED)
print(f"caption_lib {caption_lib.__version__} on {device}")

# %%
# The library draws plain matplotlib figures (no pyplot): show them inline with `display`
# %matplotlib inline

# %% [markdown]
# ## The trained model
#
# Chapter 5 trained the book's model; `ensure_trained` finds that finished run in the
# workspace and loads it (a fresh machine trains it once: a few minutes here, on the CPU).
# We use the checkpoint with the best validation BLEU-4, `best.pt`. With `CHECKPOINT_URL`
# set, `Captioner.from_url` downloads a published model instead (once, into the
# workspace), checks its SHA-256 and loads it: no training at all.

# %%
# NBVAL_IGNORE_OUTPUT
if DATASET == "shapes":
    data_dir = caption_lib.ensure_shapes()  # 3000 / 300 / 300 images, generated once
else:
    from caption_lib.download import prepare_flickr8k

    data_dir = prepare_flickr8k()  # about 1 GB, on Colab
if CHECKPOINT_URL:
    from caption_lib.download import fetch_checkpoint

    checkpoint = fetch_checkpoint(CHECKPOINT_URL, CHECKPOINT_SHA256)
    model = Captioner.from_url(CHECKPOINT_URL, CHECKPOINT_SHA256, map_location=device).eval()
else:
    model_config, config = recipe(DATASET)
    run = ensure_trained(data_dir, model_config, config, device=device)
    checkpoint = run.out_dir / "best.pt"
    model = Captioner.load(checkpoint, map_location=device).eval()
vocab = model.vocab
test_records = split_records(load_dataset(data_dir), "test")
print(f"{checkpoint.parent.name}/{checkpoint.name}: encoder weights {model.encoder.weights_used}, "
      f"V = {len(vocab)} words, {len(test_records)} test images")

# %% [markdown]
# The frozen part of the encoder never changes, so its output for the test images comes
# from the feature cache (computed once); `model.encode_cached` runs the rest of the encoder (the
# fine-tuned stage, if any) and gives the region features $a$ of each image.

# %%
# NBVAL_IGNORE_OUTPUT
store = cached_features(model.encoder, [r.image for r in test_records],
                        cache_root=caption_lib.workspace_dir() / "features", device=device,
                        progress=False)


def features_of(index: list[int]) -> torch.Tensor:
    """Region features (B, 49, 2048) of some test images."""
    with torch.no_grad():
        return model.encode_cached(store[torch.tensor(index)])  # (B, 49, 2048)


features = features_of([0, 1])  # (2, 49, 2048)
print("region features of 2 images:", tuple(features.shape))

# %%
# NBVAL_CHECK_OUTPUT
assert features.shape == (2, 49, 2048)
print("features:", tuple(features.shape), "= (B, P, E)")

# %% [markdown]
# ## From probabilities to a caption
#
# The decoder gives, at each step $t$, a distribution over the next word given the image
# and the words so far. A caption $y = (y_1, \dots, y_T)$ ending with `<end>` has the
# log-probability
#
# $$
# \log p(y \mid a) = \sum_{t=1}^{T} \log p(y_t \mid y_{<t}, a),
# $$ (eq-seq-logp)
#
# and the caption we want is the most probable one, $\hat y = \arg\max_y \log p(y \mid a)$.
# With $V$ words and captions of 10 words there are $V^{10}$ candidates: we cannot try
# them all.
#
# **Greedy decoding** takes the most likely word at every step,
# $\hat y_t = \arg\max_w \log p(w \mid \hat y_{<t}, a)$. It is fast, but a word chosen
# early is never reconsidered: if "a big" was slightly more likely than "two" at step 1,
# greedy decoding cannot later discover that "two small circles ..." was the more probable
# caption as a whole.
#
# **Beam search** keeps the $k$ most probable prefixes ("beams") instead of one. At each
# step it extends every beam $b$ (score $s_b$) by every word $w$,
#
# $$
# s_{b,w} = s_b + \log p(w \mid y^{(b)}, a), \qquad b = 1..k, \; w = 1..V,
# $$ (eq-beam-step)
#
# and keeps the $k$ best of these $k \cdot V$ candidates. A candidate ending with `<end>`
# is set aside as a finished caption. Because $\log p \le 0$, scores only fall as captions
# grow, so a plain sum favours short captions; finished captions are therefore ranked by
# the mean log-probability per word (length normalisation, $|y|$ counts `<end>`):
#
# $$
# \text{score}(y) = \frac{1}{|y|} \sum_{t=1}^{|y|} \log p(y_t \mid y_{<t}, a).
# $$ (eq-length-norm)
#
# With $k = 1$ beam search is exactly greedy decoding. Xu et al. {cite:p}`xu2015show`
# caption their test images with beam search; `caption_lib.beam_search` runs the beams of
# a whole batch of images as one batch for the decoder.

# %% [markdown]
# ### A worked example: the first two steps of a beam of 3
#
# We pick a test image where greedy decoding and beam search disagree, if the first 100
# have one (the cell's first line counts them; with none, it takes the first test image),
# and look at the candidates the search weighs.

# %%
# NBVAL_IGNORE_OUTPUT
K = BEAM_SIZE
n_first = min(100, len(test_records))
first = features_of(list(range(n_first)))  # (100, 49, 2048)
greedy_first = greedy_decode(model, first, vocab)
beam_first = beam_search(model, first, vocab, beam_size=K)
differ = [i for i in range(n_first) if greedy_first.tokens[i] != beam_first.tokens[i]]
example = differ[0] if differ else 0
print(f"greedy and beam search (k={K}) disagree on {len(differ)} of {n_first} images; "
      f"example: test image {example}")
print("greedy:", vocab.decode(greedy_first.tokens[example]))
print("beam:  ", vocab.decode(beam_first.tokens[example]))

# %% [markdown]
# Step 1: the decoder starts from `<start>`; the 3 most probable first words become the 3
# beams. Step 2: each beam is extended by every word ({eq}`eq-beam-step`); of the
# $3 \cdot V$ candidates, the 3 best survive — they may all come from the same beam.

# %%
# NBVAL_IGNORE_OUTPUT
dec = model.decoder
a = features_of([example])  # (1, 49, 2048)
with torch.no_grad():
    projected = dec.project(a)  # (1, 49, A)
    state = dec.init_state(a)  # (1, H), (1, H)
    start = torch.tensor([vocab.start_id], device=device)  # (1,)
    logits, state, _ = dec.step(start, state, a, projected)  # (1, V)
    logp1 = logits.float().log_softmax(dim=-1)[0]  # (V,)
    scores1, words1 = logp1.topk(K)  # (k,), (k,)
    print("step 1: the k best first words")
    for s, w in zip(scores1.tolist(), words1.tolist()):
        print(f"   {vocab.itos[w]:>10s}   log p = {s:6.3f}")

    # step 2: the k beams as one batch
    state = (state[0].repeat(K, 1), state[1].repeat(K, 1))  # (k, H) x 2
    a_k, proj_k = a.repeat(K, 1, 1), projected.repeat(K, 1, 1)  # (k, 49, E), (k, 49, A)
    logits, _, _ = dec.step(words1, state, a_k, proj_k)  # (k, V)
    logp2 = logits.float().log_softmax(dim=-1)  # (k, V)
    candidates = scores1.unsqueeze(1) + logp2  # (k, V): s_b + log p(w | beam b)
    best, flat = candidates.flatten().topk(K)  # (k,), (k,)
    survivors = {(int(i) // len(vocab), int(i) % len(vocab)) for i in flat}
    print("\nstep 2: the 3 best extensions of each beam (* = among the k best overall)")
    for b in range(K):
        top_s, top_w = candidates[b].topk(3)
        row = [f"{vocab.itos[int(w)]} {s:6.3f}{'*' if (b, int(w)) in survivors else ' '}"
               for s, w in zip(top_s.tolist(), top_w.tolist())]
        print(f"   {vocab.itos[int(words1[b])]:>10s} -> " + "   ".join(row))

# %%
# NBVAL_CHECK_OUTPUT
assert logp1.shape == (len(vocab),) and candidates.shape == (K, len(vocab))
print("step 1 log-probs: (V,); step 2 candidates:", (candidates.shape[0], "V"), "= (k, V)")

# %% [markdown]
# The cell copies the image's features k times to make the batch of beams. The library's
# `beam_search` steps all images' beams at once without that copy: an image's k beams
# read its one copy of the features through `caption_lib.recurrent.RepeatedRows`, and each
# step's context $\hat z_t$ is one product per image, (k, P) weights times its (P, E)
# features. A step then reads the features once per image rather than once per beam.
#
# `beam_search(..., return_beams=True)` also returns every finished hypothesis it set
# aside, best first: its words, the sum of log-probabilities {eq}`eq-seq-logp` and the
# normalised score {eq}`eq-length-norm` it was ranked by.

# %%
# NBVAL_IGNORE_OUTPUT
result = beam_search(model, a, vocab, beam_size=K, return_beams=True)
greedy = greedy_decode(model, a, vocab)
n_greedy = len(greedy.tokens[0]) + int(greedy.finished[0])  # words (+ <end>)
print(f"greedy: {vocab.decode(greedy.tokens[0])!r}  sum log p = {greedy.scores[0]:.3f}, "
      f"per word = {greedy.scores[0] / n_greedy:.3f}")
print("beam hypotheses, best first:")
for h in result.beams[0]:
    print(f"   {vocab.decode(h.tokens)!r:48s} sum log p = {h.score:7.3f}   "
          f"per word = {h.norm_score:.3f}   finished = {h.finished}")

# %% [markdown]
# Read the log-probabilities above: the further the best first word is ahead of the
# others, the less the search has to weigh. When the second and third beams start far
# below the first, every survivor of step 2 can be an extension of the first beam, and the
# search ends where greedy decoding ends: then the two agree, as they do on every image
# the first line counts as agreeing.
#
# Over the first 100 test images: how often does beam search find a *more probable*
# caption than greedy decoding? To compare like with like we rank by the plain sum here
# (`length_norm=False`); we also look at the length of the captions each choice gives.
#
# Beam search is a heuristic, not an exact search: it can find a more probable caption,
# but it can also lose the greedy one. If at step 2 the extensions of *other*
# beams ("a big ...", "a small ...") all outrank the greedy prefix ("a yellow ..."), that
# prefix falls out of the beam, even when the caption it would have become is the most
# probable of all. A larger $k$ makes this rarer. The cell below runs plain beam search
# (`keep_greedy=False`) and counts how often it happens (with an example when it does;
# a count of 0 means this model's beams kept every greedy caption). By default `beam_search` also ranks the greedy
# caption among its finished ones, so its result never has a lower *length-normalised*
# score {eq}`eq-length-norm` than greedy's. That costs little: while the greedy prefix is
# one of the beams, its next word is the best word of that beam, already computed; after
# it falls out, its row rides along behind the beams' rows in the same decoder steps (one
# read of the weights per step for both; a cell further down times it). By the plain sum
# {eq}`eq-seq-logp` it can still be less probable, because the normalised score may prefer
# a longer caption.

# %%
# NBVAL_IGNORE_OUTPUT
def mean_len(r) -> float:
    return sum(map(len, r.tokens)) / len(r.tokens)


plain = {}
for k in (K, 2 * K):
    plain[k] = beam_search(model, first, vocab, beam_size=k, length_norm=False,
                           keep_greedy=False)
    gain = plain[k].scores - greedy_first.scores  # (100,) sum log p, beam minus greedy
    better, worse = int((gain > 1e-4).sum()), int((gain < -1e-4).sum())
    print(f"k={k:2d}: more probable than greedy on {better:3d} of {len(gain)} images, less "
          f"probable on {worse} (mean gain in log p {gain.mean():+.3f})")
    if worse:
        i = int(gain.argmin())
        print(f"      lost the greedy caption: {vocab.decode(greedy_first.tokens[i])!r} "
              f"({greedy_first.scores[i]:.2f}) -> {vocab.decode(plain[k].tokens[i])!r} "
              f"({plain[k].scores[i]:.2f})")
print(f"mean caption length: greedy {mean_len(greedy_first):.2f}, "
      f"beam (sum) {mean_len(plain[K]):.2f}, beam (per word) {mean_len(beam_first):.2f} words")

# %% [markdown]
# What keeping the greedy caption in the running costs on this model: the same search
# over the same images with and without it, each timed three times (the fastest run
# counts: it is the one the machine disturbed least).

# %%
# NBVAL_IGNORE_OUTPUT
guard_seconds = {}
for keep in (True, False):
    times = []
    for _ in range(3):
        start = time.perf_counter()
        beam_search(model, first, vocab, beam_size=K, keep_greedy=keep)
        times.append(time.perf_counter() - start)
    guard_seconds[keep] = min(times)
print(f"this model, k={K}, {len(first)} images: {1000 * guard_seconds[True]:.0f} ms with the "
      f"greedy caption kept, {1000 * guard_seconds[False]:.0f} ms without "
      f"({guard_seconds[True] / guard_seconds[False]:.2f}x the time)")
beam_bench = Path("../benchmarks/results/beam.json")  # in the repository, next to notebooks/
if beam_bench.is_file():
    bench = json.loads(beam_bench.read_text())
    print(f"the benchmark's untrained decoder (Colab sizes, {bench['sizes']['images']} images): "
          f"{bench['ratio_no_greedy_over_batched']:.2f}x the time (beam.json)")

# %% [markdown]
# What the guard costs depends on how soon the greedy prefix leaves the beams: only then
# does its row ride along. This trained model's plain search seldom lost the greedy
# caption (the "less probable" counts above), so here the guard has little to do, and the
# first line's two timings differ by about what timing on a shared machine varies from
# run to run, in either direction. The second line is the results page's beam-search
# benchmark, run on an untrained decoder, whose word probabilities are nearly flat, so
# that other beams can outrank the greedy prefix from the first steps on; read it as the
# cost when the guard has much to do.

# %% [markdown]
# ## Attention you can see
#
# For every word the decoder emits, $\alpha_t$ says where it looked ({cite:t}`xu2015show`,
# Fig. 3). `plot_attention` upsamples each 7×7 map to the image size and lays it over the
# picture: bright is attended. (The library's figures are plain matplotlib `Figure`s;
# `display(fig)` shows one, `fig.savefig(path)` saves it.)

# %% mystnb={"image": {"alt": "Three test images with the model's attention for every word of its beam-search caption, one panel per word"}}
# NBVAL_IGNORE_OUTPUT
words3, beams3 = decode_batch(model, first[:3], vocab, beam_size=K)
for i in range(3):
    assert beams3.alphas[i].shape == (len(words3[i]), 49)
    if words3[i]:  # an empty caption has nothing to show
        display(plot_attention(test_records[i].image, words3[i], beams3.alphas[i],
                               title=f"test image {i}: {' '.join(words3[i])}"))

# %%
# NBVAL_CHECK_OUTPUT
print("alphas of image 0:", ("T", beams3.alphas[0].shape[1]), "= (T words, P regions)")

# %% [markdown]
# ## Scoring captions
#
# Every score below comes from real decoding: the model sees only the image (no teacher
# forcing), and `<start>`, `<end>` and `<pad>` never reach the metrics. Scores are over
# the whole test split ("corpus" scores) against its 5 reference captions per image,
# multiplied by 100 as captioning papers report them (BLEU, ROUGE-L and METEOR are then
# between 0 and 100; CIDEr-D is not bounded by 100):
#
# - **BLEU-n** {cite:p}`papineni2002bleu`: the geometric mean of the clipped $m$-gram
#   precisions $p_1, \dots, p_n$ times a brevity penalty,
#
# $$
# \text{BLEU-}n = \text{BP} \cdot \exp\Big(\frac{1}{n} \sum_{m=1}^{n} \log p_m\Big), \qquad
# p_m = \frac{\sum_{\text{$m$-grams } g \in \hat y} \min\big(c_{\hat y}(g), \max_r c_r(g)\big)}
#            {\sum_{\text{$m$-grams } g \in \hat y} c_{\hat y}(g)}, \qquad
# \text{BP} = \min\big(1, e^{1 - r/c}\big),
# $$ (eq-bleu)
#
#   where $c_{\hat y}(g)$ counts $g$ in the caption, $c_r(g)$ in reference $r$, $c$ is the
#   caption length and $r$ the length of the reference closest to it (sums over the corpus);
# - **CIDEr-D** {cite:p}`vedantam2015cider`: cosine similarity of TF-IDF weighted
#   $n$-grams (words common in all references count little), times 10 in the COCO
#   evaluation code, so up to 10 per caption before the ×100: on the shapes grammar, where
#   a good caption shares its references' rarer $n$-grams, it lands far above 100;
# - **ROUGE-L**: the longest common subsequence with the references;
# - **METEOR**: unigram matches with stems and synonyms, and a penalty for fragmentation
#   (a Java program: `None` without Java).
#
# `evaluate` captions the whole split with the given beam size and computes all of them;
# METEOR is slow, so we compute it once, for $k = 3$.

# %%
# NBVAL_IGNORE_OUTPUT
evaluations = {k: evaluate(model, data_dir, "test", beam_size=k, device=device,
                           meteor=(k == BEAM_SIZE), progress=False) for k in BEAM_SIZES}
columns = ["bleu1", "bleu2", "bleu3", "bleu4", "cider", "rougeL", "meteor",
           "semantic_f1", "grounding"]


def score_cell(scores: dict, name: str) -> str:
    """A score as the table shows it: n/a when the data set has no ground truth for it."""
    value = scores.get(name)
    if value is None:
        return "n/a"
    return f"{value:.3f}" if name in ("semantic_f1", "grounding") else f"{value:.1f}"


rows = ["| k | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
rows += [f"| {k} | " + " | ".join(score_cell(ev.scores, c) for c in columns) + " |"
         for k, ev in evaluations.items()]
display(Markdown("\n".join(rows)))

# %% [markdown]
# Compare the rows: how much do more beams buy? On the shapes data set the references
# come from a small grammar, so a model that has learned the grammar matches many
# $n$-grams whatever objects it names; what BLEU hardly sees is *what* the caption says (a
# wrong colour, a wrong shape). The cell below puts the change of BLEU-4 next to the
# change of semantic F1 (next section) and of the captions' length.

# %%
# NBVAL_IGNORE_OUTPUT
lengths_by_k = {k: sum(len(i["caption"].split()) for i in ev.captions) / len(ev.captions)
                for k, ev in evaluations.items()}
low, high = min(evaluations), max(evaluations)
print("mean caption length: " + ", ".join(f"k={k}: {n:.2f} words" for k, n in lengths_by_k.items()))
f1 = {k: ev.scores.get("semantic_f1") for k, ev in evaluations.items()}  # None: no ground truth
print(f"from k={low} to k={high}: BLEU-4 {evaluations[high].scores['bleu4'] - evaluations[low].scores['bleu4']:+.1f}, "
      "semantic F1 " + ("n/a" if f1[low] is None else f"{f1[high] - f1[low]:+.3f}"))
unchanged = sum(a["caption"] == b["caption"]
                for a, b in zip(evaluations[low].captions, evaluations[high].captions))
print(f"captions the same word for word at k={low} and k={high}: {unchanged} of "
      f"{len(evaluations[low].captions)}")
if f1[low] is not None:  # the reading of that line, for this build
    moved = f1[high] - f1[low]
    print("semantic F1 " + ("rose with k too: the wider search also named the objects better"
                            if moved >= 0.01 else "fell with k" if moved <= -0.01 else
                            "stayed within 0.01: " + (
                                "the wider search changed no caption"
                                if unchanged == len(evaluations[low].captions) else
                                f"the {len(evaluations[low].captions) - unchanged} caption(s) "
                                "the wider search changed moved it by less than that")))

# %% [markdown]
# Why captions can change length with $k$ (the first line above says whether they did in
# this build, the third how many captions changed at all): the length-normalised score
# {eq}`eq-length-norm` is a mean per word, so a longer caption made of very probable
# filler words ("a picture of", "there are two shapes") can outrank a shorter one; greedy
# decoding has no such choice. Longer captions meet more of the references' $n$-grams and
# BLEU's brevity penalty less often, so BLEU can rise with $k$ while the objects the
# caption names, which semantic F1 counts, stay the same. On shapes a gain in BLEU-4 is
# therefore not, by itself, a better description of the picture. The last line above says
# what happened to the named objects in this build: when F1 rises with $k$ as well, the
# captions the wider search found are both more probable and more often right.

# %%
# NBVAL_IGNORE_OUTPUT
chosen = evaluations[BEAM_SIZE]
assert chosen.scores["images"] == len(test_records)
for ev in evaluations.values():
    for item in ev.captions:
        assert not {"<start>", "<end>", "<pad>"} & set(item["caption"].split())
# loose floors: a broken pipeline (or an untrained model) fails here
assert chosen.scores["bleu4"] > 10, chosen.scores
# semantic F1 needs per-object ground truth: shapes has it, Flickr8k does not
has_truth = all(r.objects is not None for r in test_records)
assert has_truth == ("semantic_f1" in chosen.scores)
if has_truth:
    assert chosen.scores["semantic_f1"] > 0.25, chosen.scores
print({k: round(v, 3) if isinstance(v, float) else v for k, v in chosen.scores.items()})

# %% [markdown]
# ### Decoding in bf16
#
# Much of a search's time goes into matrix products, the largest of them the context's
# and $h_{t-1}$'s shares of the LSTM gates and the output layer $L_o$. `precision="bf16"`
# (`beam_search`, `greedy_decode`, `evaluate(..., decode_precision=...)`, and
# `caption-lib evaluate/caption --precision bf16`) runs them on a bfloat16 copy of the
# decoder; the log-probabilities, the beams' scores and the attention's scores $e_{ti}$
# (the sum, tanh and product with $w$ of the paper's eq. (4), a few rows at a time) stay
# fp32: on the Intel Xeon of the results page's `attention.json` a bfloat16 tanh was
# several times slower than an fp32 one (on the AMD EPYC of its `attention__epyc.json` it
# was not). Decoding in either precision computes that tanh as $2\sigma(2x) - 1$, the same
# function, its constants folded into $w$ and the bias: on that AMD EPYC PyTorch's fp32
# tanh was several times slower than the doubling and sigmoid that replace it (the
# results page prints both). bfloat16 keeps fp32's range but only 8 bits of mantissa,
# so where two words are nearly tied the search may pick the other one. The cell decodes the test split both ways with the same beam size.

# %%
# NBVAL_IGNORE_OUTPUT
timed, seconds = {}, {}
for precision in ("fp32", "bf16"):
    start = time.perf_counter()
    timed[precision] = evaluate(model, data_dir, "test", beam_size=BEAM_SIZE, device=device,
                                meteor=False, progress=False, decode_precision=precision)
    seconds[precision] = time.perf_counter() - start
same = sum(a["caption"] == b["caption"]
           for a, b in zip(timed["fp32"].captions, timed["bf16"].captions))
display(Markdown("\n".join(
    ["| precision | seconds (decode + score) | BLEU-4 | semantic F1 |", "|---|---|---|---|"]
    + [f"| {p} | {seconds[p]:.1f} | {ev.scores['bleu4']:.1f} | {score_cell(ev.scores, 'semantic_f1')} |"
       for p, ev in timed.items()])))
speed = seconds["fp32"] / seconds["bf16"]


def change(name: str, digits: int) -> float:
    """bf16's score minus fp32's, as the table's rounded figures differ."""
    return round(timed["bf16"].scores[name], digits) - round(timed["fp32"].scores[name], digits)


bench = Path(caption_lib.__file__).resolve().parents[1] / "benchmarks" / "results" / "beam.json"
bench_ratio = json.loads(bench.read_text()).get("ratio_bf16_over_fp32_batched") if bench.is_file() else None
display(Markdown(
    f"{same} of {len(test_records)} test captions are the same word for word in both "
    f"precisions (BLEU-4 {change('bleu4', 1):+.1f} "
    + ("" if "semantic_f1" not in timed["fp32"].scores else
       f"and semantic F1 {change('semantic_f1', 3):+.3f} ")
    + f"in bf16), and bf16 took {1 / speed:.2f} times the time of fp32 here ({device.type}). "
    + ("The seconds include what bf16 does not change (reading the cached features through "
       "the encoder's trained stage, and the scoring), and this model's products are small "
       f"({model.decoder.decoder_dim}-wide states, {len(vocab)} words), so bf16 gains "
       f"{'nothing' if speed <= 1 else 'little'} here. "
       if speed < 1.3 and device.type == "cpu" else "")
    + (f"At the Colab recipe's sizes the batched search ran {bench_ratio:g}× faster in bf16 "
       "on the CPU of `benchmarks/results/beam.json` (see the results page). "
       if bench_ratio else "")
    + "The book's scores use fp32."))

# %% [markdown]
# ## Does the caption say what is in the picture? Semantic F1
#
# The shapes data set knows every object in every image. From a caption we parse the
# (colour, shape) pairs it names (`parse_mentions`: "a small red circle left of a blue
# square" names (red, circle) and (blue, square)) and compare them, as multisets, with the
# objects in the scene. Over the corpus, with $\mathrm{TP}$ pairs named and present,
# $\mathrm{FP}$ named but absent and $\mathrm{FN}$ present but not named,
#
# $$
# \text{precision} = \frac{\mathrm{TP}}{\mathrm{TP} + \mathrm{FP}}, \qquad
# \text{recall} = \frac{\mathrm{TP}}{\mathrm{TP} + \mathrm{FN}}, \qquad
# F_1 = \frac{2\,\mathrm{TP}}{2\,\mathrm{TP} + \mathrm{FP} + \mathrm{FN}}.
# $$ (eq-semantic-f1)
#
# Unlike BLEU, $F_1$ does not reward copying the references' phrasing: "a red circle" for
# a picture of a blue circle shares most $n$-grams with the truth and is still wrong.

# %%
# NBVAL_CHECK_OUTPUT
print(parse_mentions("a small red circle left of a blue square"))
print(semantic_f1([tokenize("a red circle and a red circle")],
                  [[{"colour": "red", "shape": "circle"}]]))

# %% [markdown]
# ## Is the model looking at the object it names? Attention grounding
#
# When the decoder emits the shape word of an object $o$ at step $t$ (e.g. "circle" in
# "a red circle"), we find the cells $\mathcal{C}(o)$ of the 7×7 grid that the object's
# box covers (`object_cell_mask`) and measure the share of the attention on them. Averaged
# over the set $\mathcal{W}$ of all such words in the test captions,
#
# $$
# \text{grounding} = \frac{1}{|\mathcal{W}|} \sum_{(t, o) \in \mathcal{W}}
#     \sum_{p \in \mathcal{C}(o)} \alpha_{t,p} \;\in [0, 1].
# $$ (eq-grounding)
#
# A model that spreads its attention evenly over the 49 regions scores the mean of
# $|\mathcal{C}(o)| / 49$ (computed below: the share of the grid our objects cover); 1
# means all the attention is on the object. The `argmax` variant counts
# the words whose most-attended region lies on the object. Shape words naming no object in
# the scene (hallucinations, which $F_1$ already counts) are skipped.

# %%
# NBVAL_IGNORE_OUTPUT
if not has_truth:
    print("grounding: n/a (this data set has no per-object ground truth)")
else:
    hyps = [item["caption"].split() for item in chosen.captions]
    objects = [r.objects for r in test_records]
    report = grounding_report(hyps, chosen.alphas, objects)
    uniform = torch.stack([object_cell_mask(o).float().mean() for scene in objects
                           for o in scene]).mean()  # evenly spread attention
    print(f"evenly spread attention would score:     {uniform:.3f}")
    print(f"grounding (attention mass on the object): {report['mass']:.3f}")
    print(f"grounding (arg-max region on the object): {report['argmax']:.3f}")
    print(f"shape words counted: {report['words']}, naming no object: {report['skipped']}")

# %% [markdown]
# ## Where it fails
#
# The captions whose semantic $F_1$ is below 1, with what is really in the scene and one
# reference caption. The cell counts where the failures are: how many objects their
# scenes hold (against all test images), and how many of the wrong mentions borrow a
# colour or a shape from another object of the same scene. Read the counts with the
# gallery: when failures gather in the three-object scenes and the wrong words are
# borrowed from a neighbour, the model has seen the right attributes but bound them to the
# wrong object, an error of attention (where it looked while naming), not of vision.

# %% mystnb={"image": {"alt": "Test images whose generated caption misses or misnames an object, each with the model's caption, the true scene, a reference and its F1"}}
# NBVAL_IGNORE_OUTPUT
if not has_truth:
    print("semantic F1: n/a (this data set has no per-object ground truth)")
else:
    assert [item["image"] for item in chosen.captions] == [str(r.image) for r in test_records]
    per_image = [semantic_f1([h], [o]) for h, o in zip(hyps, objects)]
    failures = [i for i, f in enumerate(per_image) if f < 1.0]
    print(f"{len(failures)} of {len(per_image)} test captions have F1 < 1")
    by_count = {n: sum(len(objects[i]) == n for i in failures) for n in (1, 2, 3)}
    print("failures by objects in the scene:", by_count,
          "| all test images:", {n: sum(len(o) == n for o in objects) for n in (1, 2, 3)})
    borrowed = 0  # a wrong (colour, shape) whose colour or shape belongs to another object
    for i in failures:
        truth = [(o["colour"], o["shape"]) for o in objects[i]]
        wrong = [m for m in parse_mentions(chosen.captions[i]["caption"]) if m not in truth]
        borrowed += any(c in {t[0] for t in truth} or sh in {t[1] for t in truth}
                        for c, sh in wrong)
    print(f"failures naming a colour or shape that another object of the scene has: {borrowed}")
    shown = failures[:6]
    if shown:
        labels = []
        for i in shown:
            truth = ", ".join(f"{o['size']} {o['colour']} {o['shape']}" for o in objects[i])
            labels.append(f"model: {chosen.captions[i]['caption']}\n"
                          f"scene: {truth}\n"
                          f"ref: {test_records[i].captions[0]}\n"
                          f"F1 = {per_image[i]:.2f}")
        display(show_grid([test_records[i].image for i in shown], labels, cols=3,
                          title="Captions with semantic F1 < 1", width=36))

# %% [markdown]
# ## Caption your own image
#
# `caption_image` takes a PIL image (any mode: grayscale, RGBA, CMYK, palette, 16-bit) or
# a file: it resizes it to 224×224, encodes it and runs beam search. On Colab the cell
# below asks you to upload pictures (a model trained on shapes only knows shapes: on
# Flickr8k, try a photo). A phone photo stores its rotation in EXIF, and files are read
# upright from it, as a photo viewer shows them; a HEIC photo (iPhone) is a format PIL
# cannot read: one error line names the file, convert it to JPEG. Off Colab we caption a
# freshly generated shapes image — one the model has never seen — and its grayscale copy,
# which has no colour to name.

# %% mystnb={"image": {"alt": "A newly generated shapes image and its grey copy, each with the attention for every word of the caption the model wrote"}}
# NBVAL_IGNORE_OUTPUT
own_dir = Path(tempfile.mkdtemp())
if "google.colab" in sys.modules:
    from google.colab import files

    uploaded = files.upload()  # {file name: bytes}
    own_images = []
    for name, data in uploaded.items():
        (own_dir / name).write_bytes(data)
        own_images.append(own_dir / name)
else:
    fresh_dir = make_shapes(own_dir / "fresh", n_train=0, n_val=0, n_test=1, seed=2026,
                            progress=False)
    fresh = next((fresh_dir / "images").glob("*.png"))
    grey = own_dir / "grey.png"
    Image.open(fresh).convert("L").save(grey)
    own_images = [fresh, grey]
own_words = {}  # file name -> the caption's words
for path in own_images:
    words, alphas = caption_image(model, path, beam_size=BEAM_SIZE, device=device)
    own_words[path.name] = words
    print(f"{path.name}: {' '.join(words)}")
    if words:
        display(plot_attention(path, words, alphas, title=f"{path.name}: {' '.join(words)}"))

# %%
# NBVAL_IGNORE_OUTPUT
if "google.colab" not in sys.modules:
    scene = caption_lib.load_dataset(fresh_dir)[0].objects  # the generator's ground truth
    truth = ", ".join(f"{o['size']} {o['colour']} {o['shape']}" for o in scene)
    pairs = {(o["colour"], o["shape"]) for o in scene}
    said = caption_lib.shapes.parse_mentions(own_words[fresh.name])  # (colour, shape) named
    right = [" ".join(m) for m in said if m in pairs]
    wrong = [" ".join(m) for m in said if m not in pairs]
    grey_words = own_words[grey.name]
    named = [w for w in grey_words if w in caption_lib.shapes.COLOURS]
    shapes_named = [w for w in grey_words if w in caption_lib.shapes.SHAPES]
    print(f"scene of the new image: {truth}")
    print(f"new image's caption: in the scene {right or 'none'}; not in it {wrong or 'none'}")
    print(f"grey copy's caption: colour words {named or 'none'}, shape words "
          f"{shapes_named or 'none'} (the scene's shapes: "
          f"{', '.join(sorted({o['shape'] for o in scene}))})"
          + ("; it ends on a size word, where a colour would come next"
             if grey_words and grey_words[-1] in caption_lib.shapes.SIZES else ""))

# %% [markdown]
# Read the two captions against the scene (the lines above compare them). On the new
# image, a (colour, shape) pair "not in" the scene is a mistake of the kind semantic F1
# counts, such as the right colour on the wrong shape: the binding that three-object
# scenes make hard (the failures above). The grey copy has no colour in it, and every
# training caption names one right before each shape word. So the model either guesses a
# colour, and then a shape to go with it that need not be in the scene (the last line
# lists the scene's shapes), or, having never seen a caption go on without a colour, ends
# the sentence early where the colour should come: a caption that stops after a size word
# names no object at all. A model can only say what its training captions say.
#
# The same from the command line. `caption-lib caption` prints `IMAGE<TAB>caption` per
# image; a file that is not a readable image (empty, truncated, another format, or a
# decompression bomb larger than PIL's pixel limit) gets one error line naming it, the
# other files are still captioned, and the exit code is 2. `--attention-plot OUT.png`
# writes the figure above (for several images `OUT-1.png`, `OUT-2.png`, ...).

# %%
# NBVAL_IGNORE_OUTPUT
broken = own_dir / "broken.png"
broken.write_bytes(b"not a picture")
command = [sys.executable, "-m", "caption_lib", "caption", str(checkpoint),
           *map(str, own_images), str(broken), "--beam-size", str(BEAM_SIZE),
           "--attention-plot", str(own_dir / "attention.png")]
done = subprocess.run(command, capture_output=True, text=True, check=False)
print("$ caption-lib caption CHECKPOINT " + " ".join(p.name for p in own_images)
      + " broken.png --attention-plot attention.png")
print((done.stdout + done.stderr).replace(str(own_dir) + "/", ""))
print("exit code:", done.returncode)
assert done.returncode == 2 and done.stdout.count("\n") == len(own_images)

# %% [markdown]
# ## Summary
#
# - A caption is decoded word by word; greedy decoding commits to each word, beam search
#   keeps the $k$ most probable prefixes {eq}`eq-beam-step`: it finds a more probable
#   caption where the model hesitates between words, and as a heuristic it can lose the
#   greedy one; a model sure of every word gives the same caption both ways. Finished captions
#   are ranked per word {eq}`eq-length-norm`, since plain sums favour short captions.
# - Beam search runs all beams of all images of a batch as one batch for the decoder.
# - Scores come from real decoding over the whole test split: BLEU-1..4 {eq}`eq-bleu`,
#   CIDEr, ROUGE-L, METEOR (all ×100; CIDEr is not bounded by 100).
# - Shapes' ground truth measures what text metrics cannot: semantic $F_1$
#   {eq}`eq-semantic-f1` (is the named object there?) and attention grounding
#   {eq}`eq-grounding` (does the model look at it while naming it?).
# - `caption_image` and `caption-lib caption` caption any image file; broken files are
#   reported one line each, never silently skipped.

# %% [markdown]
# ## Exercises
#
# Exercise 1 is a quick check; exercise 2 is a task that needs thought (BLEU's clipping
# and brevity penalty, from {eq}`eq-bleu`); exercise 3 is a question in words. The test
# cells say in one sentence what is wrong. The next cell imports what the exercises need,
# so this section also runs on its own, without the trained model (it is the chapter's
# nbgrader assignment: see *For instructors*).

# %%
# the exercises' imports
import torch

from caption_lib import checks, tokenize
from caption_lib.metrics import bleu

# %% [markdown]
# **Exercise 1 (quick check).** Implement one step of beam search ({eq}`eq-beam-step`)
# for one image: given the log-probabilities `log_probs` `(k, V)` of the next word for
# each of the $k$ beams and the beams' scores `beam_scores` `(k,)`, return the $k$ best
# candidates as three tensors `(beam, word, score)`, each `(k,)`, best first: `beam[j]`
# is the beam the candidate extends (int64), `word[j]` the word added (int64), `score[j]`
# its new score.

# %% nbgrader={"grade": false, "grade_id": "ex1-solution", "locked": false, "schema_version": 3, "solution": true}
def beam_step(log_probs: torch.Tensor, beam_scores: torch.Tensor):
    ### BEGIN SOLUTION
    k, V = log_probs.shape
    scores, flat = (beam_scores.unsqueeze(1) + log_probs).flatten().topk(k)  # (k,), (k,)
    return torch.div(flat, V, rounding_mode="floor"), flat % V, scores
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex1-test", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# visible: a hand-made 2-beam, 3-word example
log_probs = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
beam_w, word_w, score_w = beam_step(log_probs, torch.log(torch.tensor([0.6, 0.4])))
checks.check_equal(beam_w.tolist(), [1, 0], "beam", "the best candidate, 0.4 * 0.8, extends beam 1")
checks.check_equal(word_w.tolist(), [2, 0], "word")
checks.check_close(score_w.exp(), torch.tensor([0.32, 0.30]), "exp(score)")
### BEGIN HIDDEN TESTS
# hidden: 20 random beams and vocabularies against a reference


def _reference_beam_step(log_probs, beam_scores):
    V = log_probs.size(1)
    cand = (beam_scores.unsqueeze(1) + log_probs).flatten()  # (k*V,)
    scores, flat = cand.topk(log_probs.size(0))  # (k,), (k,)
    return flat // V, flat % V, scores


def _beam_inputs(g):
    k, V = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(6, 40, (1,), generator=g))
    log_probs = torch.randn(k, V, generator=g).log_softmax(dim=1)  # (k, V)
    return log_probs, -5 * torch.rand(k, generator=g)  # (k, V), (k,)


checks.check_function(beam_step, _reference_beam_step, _beam_inputs, trials=20)
### END HIDDEN TESTS
checks.passed("Exercise 1")

# %% [markdown]
# **Exercise 2 (task).** Compute BLEU-4 ({eq}`eq-bleu`, $n = 4$, on a 0–100 scale) by
# hand for one caption `hypothesis` (a list of at least 4 words) against its
# `references` (lists of words): clip each $m$-gram count by its largest count in any
# single reference, take $r$ as the length of the reference closest to the caption's
# length (the shorter one on a tie), and return 0 when some $p_m$ is 0. Do not use nltk
# or `caption_lib.metrics`. Why does a 3-word caption get BLEU-4 = 0 however good it is?

# %% nbgrader={"grade": false, "grade_id": "ex2-solution", "locked": false, "schema_version": 3, "solution": true}
def bleu4_by_hand(references: list[list[str]], hypothesis: list[str]) -> float:
    ### BEGIN SOLUTION
    import math
    from collections import Counter

    def ngrams(words, m):
        return Counter(tuple(words[i:i + m]) for i in range(len(words) - m + 1))

    log_p = 0.0
    for m in range(1, 5):
        counts = ngrams(hypothesis, m)
        clip = Counter()
        for ref in references:
            clip |= ngrams(ref, m)  # the largest count in any one reference
        matched = sum(min(c, clip[g]) for g, c in counts.items())
        if matched == 0:
            return 0.0
        log_p += math.log(matched / sum(counts.values())) / 4
    c = len(hypothesis)
    r = min((abs(len(ref) - c), len(ref)) for ref in references)[1]
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return 100 * bp * math.exp(log_p)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex2-test", "locked": true, "points": 4, "schema_version": 3, "solution": false}
# visible: one caption against caption_lib.metrics.bleu; 20 random sentences
refs = [tokenize("a big red circle left of a small blue square"),
        tokenize("a red circle and a blue square")]
hyp = tokenize("a red circle left of a blue square")
mine = bleu4_by_hand(refs, hyp)
expected = bleu([refs], [hyp])["bleu4"]
print(f"by hand {mine:.3f}, caption_lib.metrics.bleu {expected:.3f}")
checks.check_close(torch.tensor(float(mine), dtype=torch.float64),
                   torch.tensor(expected, dtype=torch.float64), name="bleu4_by_hand(...)")
checks.check_bleu4(bleu4_by_hand, trials=20)
### BEGIN HIDDEN TESTS
# hidden: 300 random sentences, repeated words (clipping), short captions (brevity penalty)
checks.check_bleu4(bleu4_by_hand, trials=300, seed=1)
### END HIDDEN TESTS
checks.passed("Exercise 2")

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 2.** A 3-word caption has no 4-gram at all, so $p_4$ is $0/0$, taken as
# 0, and the geometric mean of $p_1 \dots p_4$ is 0 — whatever its words (nltk warns and
# returns about 0; corpus BLEU avoids this by summing the counts over all captions first).
# The usual mistakes: no clipping (a caption "a a a a a" scores $p_1 = 1$), clipping by
# the sum over references instead of the maximum, the brevity penalty forgotten or with
# $r$ the longest or the first reference, and the arithmetic instead of the geometric
# mean.

# %% [markdown]
# **Exercise 3 (written).** Run the evaluation with `length_norm=False` (call
# `beam_search` on the test features yourself). Which captions get shorter, and what
# happens to BLEU's brevity penalty? Then find a test image whose caption has $F_1 = 1$
# but low grounding: what does its attention figure show?

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 3.** Ranked by the plain sum of log-probabilities, every extra word
# lowers a caption's score, so beam search prefers captions that end early: multi-object
# scenes lose their last phrase ("a big red circle left of a small blue square" becomes
# "a big red circle"), the corpus gets shorter than its references and BLEU's brevity
# penalty ($e^{1 - r/c}$ for $c < r$) lowers every $n$-gram order at once; the section
# *From probabilities to a caption* measures the mean lengths. An $F_1 = 1$ caption with
# low grounding names the right objects while attention sits elsewhere — often on the
# background next to the object, or on the other object of a relation — which shows that
# the words can come from the image as a whole (the mean-region start state, the context
# of earlier steps) rather than from the region attended at that word.

# %% [markdown]
# **Hand in.** The last cell lists the exercises whose test cell ran to its end in this
# session. On Colab, run all cells, then hand in this notebook (*File → Download →
# .ipynb*) or a copy of that list; an instructor's grader also runs hidden tests.

# %%
checks.summary({"Exercise 1": 2, "Exercise 2": 4})
