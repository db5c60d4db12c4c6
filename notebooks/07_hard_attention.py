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
# # Hard attention: one region per word, trained with REINFORCE
#
# **In this chapter you will learn**
#
# - the other half of "Show, Attend and Tell": *stochastic hard attention*
#   ({cite:t}`xu2015show`, Sec. 4.1), which looks at one region per word instead of a
#   weighted average of all of them;
# - why its objective is a lower bound on the log-likelihood, and why the gradient of
#   that bound needs the score-function estimator (REINFORCE);
# - why that estimator is noisy, and how a baseline and an entropy term tame it — measured;
# - which context a hard-attention model should decode with, measured three ways;
# - how hard and soft attention compare on the same features, the same data and the
#   same budget: BLEU-4, semantic F1, grounding, training time.

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
# Parameters: "shapes" runs offline on a CPU (what this book shows); "flickr8k" on Colab
DATASET = "shapes"
SEED = 0
EPOCHS = 2  # decoder-only epochs for each of the two models (the same budget)
GRAD_SAMPLES = 16  # gradient estimates drawn to measure the estimator's variance

# %%
# NBVAL_IGNORE_OUTPUT
import inspect
import itertools

import torch
from IPython.display import Markdown, display

import caption_lib
from caption_lib.data import load_dataset, pad_captions, split_records
from caption_lib.evaluate import evaluate
from caption_lib.features import workspace_features
from caption_lib.hard_attention import (
    HardAttentionDecoder,
    caption_log_likelihood,
    gradient_stats,
    reinforce_loss,
    update_baseline,
)
from caption_lib.metrics import grounding_report, mention_errors, semantic_f1
from caption_lib.model import Captioner
from caption_lib.train import ensure_trained, recipe, same_features_runs
from caption_lib.viz import plot_attention

device = caption_lib.pick_device("auto")
caption_lib.seed_everything(SEED)
if DATASET == "shapes":
    data_dir = caption_lib.ensure_shapes()
else:
    from caption_lib.download import prepare_flickr8k

    data_dir = prepare_flickr8k()


def table(header: list[str], rows: list[list]) -> Markdown:
    """A Markdown table, shown as a table in the book."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


print(f"caption_lib {caption_lib.__version__} on {device}; data: {data_dir}")

# %% [markdown]
# ## From soft to hard attention
#
# Soft attention (the Attention chapter) hands the decoder the *expected* context
# $\hat z_t = \sum_i \alpha_{ti} a_i$: a blend of all 49 regions. Hard attention makes a
# decision instead. At step $t$ a location $s_t$ is drawn from the attention
# distribution, and the decoder sees that one region ({cite:t}`xu2015show`, Sec. 4.1):
#
# $$
# p(s_{t} = i \mid s_{<t}, a) = \alpha_{ti}, \qquad \hat z_t = a_{s_t}.
# $$ (eq-hard-context)
#
# Everything else is the decoder we already have: the same `Attention` computes
# $\alpha_t$, the same LSTM cell (`DecoderWithAttention.update`) consumes $\hat z_t$.
# Only the choice of the context differs.
#
# ## The objective: a lower bound
#
# With a random location per word, the probability of a caption is a sum over every
# location sequence $s = (s_1, \dots, s_T)$, and its logarithm is bounded from below by
# Jensen's inequality (the logarithm is concave):
#
# $$
# \log p(y \mid a) = \log \sum_s p(s \mid a)\, p(y \mid s, a)
#   \;\ge\; \sum_s p(s \mid a) \log p(y \mid s, a) \;=\; L_s .
# $$ (eq-bound)
#
# Hard attention maximises $L_s$. Its gradient with respect to the weights $W$ follows
# from $\partial p = p\,\partial \log p$ (the paper's eq. 11):
#
# $$
# \frac{\partial L_s}{\partial W} = \sum_s p(s \mid a)
#   \Big[\frac{\partial \log p(y \mid s, a)}{\partial W}
#   + \log p(y \mid s, a)\, \frac{\partial \log p(s \mid a)}{\partial W}\Big].
# $$ (eq-bound-gradient)
#
# ## Why the gradient needs REINFORCE
#
# The sum runs over $P^T$ sequences — for a ten-word caption over 49 regions:

# %%
# NBVAL_CHECK_OUTPUT
print(f"49 ** 10 = {49 ** 10:.2e} location sequences")

# %% [markdown]
# so it is estimated from samples: draw $\tilde s \sim p(s \mid a)$ and take the bracket
# of {eq}`eq-bound-gradient` at $\tilde s$ (eq. 12 in the paper, with one sample per
# caption). The first term is ordinary back-propagation through the decoder with the
# drawn contexts. The second is the *score-function* or REINFORCE estimator
# {cite:p}`williams1992simple`: the drawn index $s_t$ is a discrete choice, no gradient
# flows through it, so instead the log-probability of the choice is pushed up in
# proportion to how good the caption turned out, $\log p(y \mid \tilde s, a)$. It is the
# only term that trains the attention network at all.
#
# ## Variance, baselines and the entropy term
#
# The REINFORCE term is unbiased but noisy: $\log p(y \mid \tilde s, a)$ is a large
# negative number (a sum over the words), so every sample pushes hard in the direction of
# $\partial \log p(\tilde s \mid a)/\partial W$, whatever its quality. Any constant $b$
# may be subtracted from it without changing the mean, because
# $\sum_s p(s \mid a)\, \partial \log p(s \mid a)/\partial W = \partial \big(\sum_s p(s \mid a)\big)/\partial W = 0$.
# A good $b$ is the typical value of $\log p(y \mid \tilde s, a)$: then only
# better-than-usual locations are reinforced and worse ones discouraged. The paper uses a
# moving average over the mini-batches $k$, $b_k = 0.9\, b_{k-1} + 0.1 \log p(y \mid \tilde s_k, a)$,
# and adds an entropy term that keeps the attention from collapsing too early. Its
# learning rule, per sampled caption:
#
# $$
# \frac{\partial L_s}{\partial W} \approx
#   \frac{\partial \log p(y \mid \tilde s, a)}{\partial W}
#   + \lambda_r \big(\log p(y \mid \tilde s, a) - b\big) \frac{\partial \log p(\tilde s \mid a)}{\partial W}
#   + \lambda_e \frac{\partial H[\tilde s]}{\partial W} .
# $$ (eq-learning-rule)
#
# Finally, "with probability 0.5" a caption uses the expected context instead of a drawn
# one (end of Sec. 4.1): that caption trains exactly like soft attention.
#
# ## The code
#
# `caption_lib.hard_attention` holds all of it. `HardAttentionDecoder` is a
# `DecoderWithAttention` whose training pass draws the locations; here is that pass:

# %%
print(inspect.getsource(HardAttentionDecoder._sampled))

# %% [markdown]
# and the estimator: `reinforce_loss` builds a *surrogate* loss whose gradient is minus
# {eq}`eq-learning-rule` — the cross-entropy of the caption under the drawn contexts,
# minus $\lambda_r (R - b) \log p(\tilde s \mid a)$ with $R = \log p(y \mid \tilde s, a)$
# held constant, minus $\lambda_e H[\tilde s]$, all divided by the number of words as
# the cross-entropy is. The baseline is a buffer of the decoder (so checkpoints carry it
# and resuming is exact); a batch uses the value from before its own samples, then moves it:

# %%
print(inspect.getsource(reinforce_loss))
print(inspect.getsource(update_baseline))

# %% [markdown]
# ## Checking the estimator where the sum can be done
#
# On a toy — 3 regions, a 3-word caption, a decoder with 5 units — all 27 location
# sequences can be enumerated, so $L_s$ and its exact gradient are known. The mean of
# many REINFORCE estimates must match it within their standard error, with or without
# a baseline; the baseline must lower their variance. (The library's tests run the same
# check, and fail when the REINFORCE term, the baseline or the entropy sign is broken.)

# %%
# NBVAL_IGNORE_OUTPUT
torch.manual_seed(0)
toy = HardAttentionDecoder(6, encoder_dim=4, embed_dim=4, decoder_dim=5, attention_dim=4,
                           dropout=0.0, expected_prob=0.0)
with torch.no_grad():
    for p in toy.parameters():
        p.mul_(3.0)  # larger weights: the words depend on where the decoder looks
a_toy = torch.randn(1, 3, 4) * 2  # (1, P=3, E=4)
y_toy, len_toy = torch.tensor([[1, 4, 5, 2]]), torch.tensor([4])  # <start> w w <end>

seqs = torch.tensor(list(itertools.product(range(3), repeat=3)))  # (27, T) every s
S = len(seqs)
enum = toy(a_toy.expand(S, -1, -1), y_toy.expand(S, -1), len_toy.expand(S), sample=True,
           locations=seqs)
p_s = enum.log_p_s.exp()  # (27,) p(s | a)
R_s = caption_log_likelihood(enum.logits, y_toy.expand(S, -1), len_toy.expand(S))  # (27,)
L_s = (p_s * R_s).sum()
exact = -torch.cat([g.reshape(-1) for g in torch.autograd.grad(L_s, list(toy.parameters()))]) / 3
print(f"sum_s p(s|a) = {p_s.sum().item():.4f};  L_s = {L_s.item():.3f} <= "
      f"log p(y|a) = {torch.logsumexp(p_s.log() + R_s, 0).item():.3f}")

batch = (a_toy.expand(32, -1, -1), y_toy.expand(32, -1), len_toy.expand(32))
g = torch.Generator().manual_seed(1)
with torch.no_grad():  # warm the moving average up, as training does
    for _ in range(60):
        out = toy(*batch, sample=True, generator=g)
        update_baseline(toy.baseline, caption_log_likelihood(out.logits, *batch[1:]),
                        out.sampled)
rows = []
for label, b in [("no baseline (b = 0)", 0.0), ("moving-average baseline", None)]:
    stats = gradient_stats(toy, *batch, samples=200, baseline=b, decay=0.9, generator=g)
    floor = 1e-5 * exact.abs().max()  # float32 noise of the exact gradient
    z = (stats.mean - exact) / (stats.stderr ** 2 + floor ** 2).sqrt()
    rows.append([label, f"{stats.variance:.3g}", f"{float(z.abs().max()):.2f}",
                 f"{float((z ** 2).mean()):.2f}"])
display(table(["estimator", "variance of one estimate", "largest absolute z", "mean z²"], rows))
worst = max(float(row[2]) for row in rows)
print(f"largest absolute z over both rows: {worst:.2f} "
      f"({'within' if worst < 4 else 'NOT within'} 4 standard errors of the exact gradient)")

# %% [markdown]
# Here $z$ is the difference between the mean estimate and the exact gradient in units of
# its standard error, one per weight. An unbiased estimator gives values of a few units
# at most and a mean square of about 1 or below (below 1 where the allowance for float32
# rounding, added to the standard error, is the larger of the two: with the baseline the
# standard error is tiny). A biased one — the REINFORCE term dropped, say — fails it
# (the library's tests plant that fault and check that it does). The printed line says where both rows stand; the baseline keeps
# the mean and divides the variance by the ratio of the two rows of the second column.
#
# ## Training on shapes: a fair comparison
#
# To compare the two mechanisms and nothing else, both decoders are trained on
# *identical* features: chapter 5's fine-tuned encoder, frozen. Its output is cached once
# (`layer4` is run over chapter 5's cached `layer3` features), so only the decoder
# trains — the cheap part of a training step. `encoder_weights` naming a checkpoint does
# exactly that (`caption_lib.model.build_encoder`); `same_features_runs` builds the two
# runs' settings from chapter 5's (the same settings, seed and number of epochs; only
# `attention` differs), and `make runs` trains them before the book is built:

# %%
# NBVAL_IGNORE_OUTPUT
model_config, config = recipe(DATASET)
chapter5 = ensure_trained(data_dir, model_config, config, device=device, progress=False,
                          log=lambda *_: None)
runs = {name: ensure_trained(data_dir, m, c, device=device, progress=False, log=lambda *_: None)
        for name, (m, c) in same_features_runs(chapter5.out_dir, model_config, config,
                                               EPOCHS).items()}
columns = ["epoch", "train_loss", "val_loss", "val_bleu4", "val_semantic_f1", "seconds"]
columns = [c for c in columns if c in runs["soft"].history[-1]]  # no F1 without ground truth
display(table(["model", *columns],
              [[name, *(f"{row[c]:.4g}" for c in columns)]
               for name, run in runs.items() for row in run.history]))
seconds = {name: sum(h["seconds"] for h in run.history) for name, run in runs.items()}
print(f"training time of both runs, when they were trained: {sum(seconds.values()):.0f} s "
      f"(soft {seconds['soft']:.0f} s, hard {seconds['hard']:.0f} s)")
print(f"encoder: {runs['hard'].model.encoder.weights_used.split(' of ')[0]} of chapter 5, frozen")

# %% [markdown]
# The training loss of the hard model is the cross-entropy under *drawn* contexts for
# half of its captions, so it sits above the soft one by construction; the validation
# columns (real greedy decoding, of each run's averaged weights, as in chapter 5) are the
# comparable ones.
#
# ## How noisy is the gradient? Measured on the trained model
#
# On one batch of validation captions, the trained hard decoder draws
# `GRAD_SAMPLES` gradient estimates with its own moving-average baseline, and as many
# with $b = 0$ (dropout off, so only the locations vary):

# %%
# NBVAL_IGNORE_OUTPUT
hard_model = Captioner.load(runs["hard"].out_dir / "best.pt", map_location=device)
val_records = split_records(load_dataset(data_dir), "val")[:32]
val_store = workspace_features(hard_model.encoder, val_records, device=device, progress=False)
with torch.no_grad():
    feats = hard_model.encode_cached(val_store[torch.arange(len(val_records))])  # (32, 49, 2048)
ids = [hard_model.vocab.encode(r.captions[0]) for r in val_records]
captions, lengths = pad_captions(ids, hard_model.vocab.pad_id)  # (32, L), (32,)
captions, lengths = captions.to(device), lengths.to(device)
variance = {}
for label, b in [("with the baseline", None), ("without (b = 0)", 0.0)]:
    stats = gradient_stats(hard_model.decoder, feats, captions, lengths, samples=GRAD_SAMPLES,
                           baseline=b, generator=torch.Generator().manual_seed(SEED))
    variance[label] = stats.variance
    print(f"{label:18s}: variance of one gradient estimate {stats.variance:.4g} "
          f"(squared norm of the mean: {float(stats.mean.double().pow(2).sum()):.4g})")
print(f"baseline b = {float(hard_model.decoder.baseline):.3f}; the baseline divides the "
      f"variance by {variance['without (b = 0)'] / variance['with the baseline']:.1f}")

# %% [markdown]
# ## Which context at test time?
#
# The paper does not say which context a hard-attention model decodes with. The
# authors' code (`kelvinxu/arctic-captions`, `generate_caps.py`) samples only when asked
# and otherwise uses the expected context $\sum_i \alpha_{ti} a_i$, as soft attention
# does; we follow it (`test_context="expected"`, the default). The alternatives are the
# most likely region (`"argmax"`, a deterministic hard decision) and a drawn one
# (`"sample"`, scored with three seeds of the draws, so that the table shows how much one
# draw's luck moves the scores). All of them, greedy decoding on the test images:

# %%
# NBVAL_IGNORE_OUTPUT
metrics = ["bleu1", "bleu4", "cider", "semantic_f1"]


def scored(model: Captioner, **options) -> dict:
    """Test-set scores with both grounding variants (mass and arg-max)."""
    result = evaluate(model, data_dir, "test", beam_size=1, device=device, progress=False,
                      **options)  # greedy decoding
    words = [c["caption"].split() for c in result.captions]
    objects = [r.objects for r in split_records(load_dataset(data_dir), "test")]
    scores = dict(result.scores)
    if all(o is not None for o in objects):
        report = grounding_report(words, result.alphas, objects)
        scores["grounding_mass"], scores["grounding_argmax"] = report["mass"], report["argmax"]
    return scores, result


contexts = {}
for context, seed in [("expected", SEED), ("argmax", SEED),
                      *((f"sample (seed {SEED + k})", SEED + k) for k in range(3))]:
    hard_model.decoder.test_context = context.split(" ")[0]
    torch.manual_seed(seed)  # the draws of "sample"
    contexts[context], _ = scored(hard_model, meteor=False)  # METEOR: below, once
hard_model.decoder.test_context = "expected"
columns = [m for m in [*metrics, "grounding_mass", "grounding_argmax"] if m in contexts["expected"]]
display(table(["test-time context", *columns],
              [[name, *(f"{s[m]:.3f}" for m in columns)] for name, s in contexts.items()]))
sampled_bleu = [s["bleu4"] for name, s in contexts.items() if name.startswith("sample")]
best_context = max(contexts, key=lambda c: contexts[c]["bleu4"])
expected_bleu = contexts["expected"]["bleu4"]
where = ("below every sampled run" if expected_bleu < min(sampled_bleu)
         else "above every sampled run" if expected_bleu > max(sampled_bleu)
         else "inside the span of the sampled runs")
print(f"highest BLEU-4: {best_context}; the three sampled runs span "
      f"{min(sampled_bleu):.1f}-{max(sampled_bleu):.1f} BLEU-4, the expected context "
      f"{expected_bleu:.1f} ({where}), arg-max {contexts['argmax']['bleu4']:.1f}")

# %% [markdown]
# The printed line is the reading. If the expected context lies inside the span of the
# sampled runs, the choice between them is within one draw's luck on this test set; if
# it lies below every sampled run, drawing decodes better for this model: the decoder
# was trained on single drawn regions for half of its captions, and when its attention
# is spread out, the expected context is a blurred average of many regions that those
# captions never showed it; if it lies above every sampled run, the draws add noise to
# each word that the expectation averages away. Arg-max, the deterministic hard decision, can fall below
# both when the most likely region is often not the object (its grounding column). We
# keep the expected context as the default, as the authors' code does, because it needs
# no random draw: the same model writes the same caption every time; `test_context`
# switches it.
#
# ## Soft against hard, side by side
#
# Both models on the test images (greedy decoding, the expected context for the hard
# model), with the training time of each run and the paper's Flickr8k figures
# ({cite:t}`xu2015show`, Table 1) beside them. **The data differ**: Flickr8k's photographs
# and free-form captions against the synthetic shapes and their small grammar, so compare
# the *direction* of the differences, not the levels.

# %%
# NBVAL_IGNORE_OUTPUT
soft_model = Captioner.load(runs["soft"].out_dir / "best.pt", map_location=device)
ours = {"soft": scored(soft_model), "hard": scored(hard_model)}
paper = {"soft": {"bleu1": 67, "bleu2": 44.8, "bleu3": 29.9, "bleu4": 19.5, "meteor": 18.93},
         "hard": {"bleu1": 67, "bleu2": 45.7, "bleu3": 31.4, "bleu4": 21.3, "meteor": 20.30}}
rows_spec = [("BLEU-1", "bleu1"), ("BLEU-4", "bleu4"), ("METEOR", "meteor"), ("CIDEr", "cider"),
             ("semantic F1", "semantic_f1"), ("grounding (mass)", "grounding_mass"),
             ("grounding (arg-max)", "grounding_argmax")]


def cell(value, key: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if key in ("semantic_f1", "grounding_mass", "grounding_argmax") \
        else f"{value:.1f}"


rows = [[label, *(cell(ours[m][0].get(key), key) for m in ("soft", "hard")),
         *(cell(paper[m].get(key), key) for m in ("soft", "hard"))] for label, key in rows_spec]
rows.append(["training time (s)", f"{seconds['soft']:.0f}", f"{seconds['hard']:.0f}",
             "n/a", "n/a"])
rows.append(["gradient variance, with / without baseline", "0 (no sampling)",
             f"{variance['with the baseline']:.3g} / {variance['without (b = 0)']:.3g}",
             "n/a", "n/a"])
display(table(["", "soft (ours, shapes)", "hard (ours, shapes)", "soft (paper, Flickr8k)",
               "hard (paper, Flickr8k)"], rows))
gap = ours["hard"][0]["bleu4"] - ours["soft"][0]["bleu4"]
paper_gap = paper["hard"]["bleu4"] - paper["soft"]["bleu4"]


def verdict(difference: float) -> str:
    return "wins" if difference > 0 else "ties" if difference == 0 else "loses"


print(f"BLEU-4, hard minus soft: {gap:+.1f} here, {paper_gap:+.1f} in the paper")
if "semantic_f1" in ours["soft"][0]:  # a data set with ground truth (shapes)
    f1_gap = ours["hard"][0]["semantic_f1"] - ours["soft"][0]["semantic_f1"]
    print(f"semantic F1, hard minus soft: {f1_gap:+.3f}")
    print(f"on {DATASET}, hard attention {verdict(gap)} on BLEU-4 and {verdict(f1_gap)} on "
          f"semantic F1 after {EPOCHS} epochs each")
if "grounding_mass" in ours["soft"][0]:
    hard_result = ours["hard"][1]
    uniform = grounding_report([c["caption"].split() for c in hard_result.captions],
                               [torch.full_like(a, 1 / a.size(-1)) for a in hard_result.alphas],
                               [r.objects for r in split_records(load_dataset(data_dir), "test")])
    print(f"attention on the named object (mass): soft {ours['soft'][0]['grounding_mass']:.3f}, "
          f"hard {ours['hard'][0]['grounding_mass']:.3f}; uniform attention over the 49 "
          f"regions would give {uniform['mass']:.3f} on the hard model's captions")
    relation = ("below" if ours["hard"][0]["grounding_mass"] < uniform["mass"] - 0.01
                else "above" if ours["hard"][0]["grounding_mass"] > uniform["mass"] + 0.01
                else "at")
    print(f"the hard model's attention mass is {relation} the uniform level")
else:
    print(f"on {DATASET}, hard attention {verdict(gap)} on BLEU-4 after {EPOCHS} epochs each "
          "(semantic F1 and grounding: n/a, no ground truth)")

# %% [markdown]
# How to read the table: the first two columns are this build's measurement, the last
# two the paper's (METEOR needs Java; "n/a" where it is missing). The printed lines under
# the table say which way each difference goes on shapes, and by how much; the last one
# sets the hard model's grounding beside what attention spread evenly over the 49
# regions would score: at that level the hard model has not learnt where to look, and
# below it its attention avoids the objects it names, so the words come from elsewhere
# (the start state is the mean of all regions, and the LSTM's memory carries what
# earlier steps saw). Where a short REINFORCE run ends below the uniform level, this
# chapter does not measure why; exercise 3 is a way in. Why hard attention can lose on this data set within a short budget: its
# gradient for the attention is a noisy estimate (the variance row), while soft
# attention's is exact, and a shapes caption names several small objects whose positions
# the decoder must find word by word — a drawn wrong region costs a wrong word at once.
# The paper's advantage for hard attention came after long training on photographs, and
# was small (the paper's BLEU-4 difference, printed above). The training-time row is
# the wall-clock time of each run when it was trained (on a shared machine it varies);
# the cost of one step, measured side by side, is on the Results page.
#
# ## Where each model looks
#
# The same test image, captioned by both models; every panel is one word and its
# attention $\alpha_t$ (for the hard model, the distribution its locations are drawn
# from). The lines above the figure give the image's reference caption and, for each
# model, the caption's semantic F1 and its attention mass on the named objects for this
# one image:

# %% mystnb={"image": {"alt": "The same test image captioned by the soft and the hard attention model: one panel per word with that word's attention map"}}
# NBVAL_IGNORE_OUTPUT
# %matplotlib inline
test_records = split_records(load_dataset(data_dir), "test")
# a scene of two or more objects (shapes); data without ground truth: the first test image
image = next((r for r in test_records if r.objects and len(r.objects) >= 2), test_records[0])
index = test_records.index(image)
print(f"reference: {image.captions[0]}")
mass_here = {}
for name, model in (("soft", soft_model), ("hard", hard_model)):
    result = ours[name][1]
    words, alphas = result.captions[index]["caption"].split(), result.alphas[index]
    if not (words and image.objects):  # nothing to measure against
        print(f"{name}: {' '.join(words)!r} (semantic F1 and grounding: n/a)")
        continue
    mass_here[name] = grounding_report([words], [alphas], [image.objects])["mass"]
    print(f"{name}: {' '.join(words)!r}; semantic F1 {semantic_f1([words], [image.objects]):.2f}, "
          f"attention mass on the named objects {mass_here[name]:.2f}")
    wrong, missed = mention_errors(words, image.objects)
    print(f"      named but not in the scene: {wrong or 'none'}; "
          f"in the scene but not named: {missed or 'none'}")
if len(mass_here) == 2:
    higher = max(mass_here, key=mass_here.get)
    print(f"on this image the {higher} model puts more of its attention on the objects it names"
          if abs(mass_here["soft"] - mass_here["hard"]) >= 0.01 else
          "on this image both models put about as much attention on the objects they name")
for name, model in (("soft", soft_model), ("hard", hard_model)):
    result = ours[name][1]
    words, alphas = result.captions[index]["caption"].split(), result.alphas[index]
    if words:
        display(plot_attention(image.image, words, alphas,
                               title=f"{name} attention: {' '.join(words)}"))

# %% [markdown]
# Compare the two rows of maps with the printed lines. A caption with semantic F1 below 1
# is wrong for this image (a repeated object, a missed one, a colour on the wrong
# shape; the lines under each caption name its wrong and its missing pairs): trained for
# two epochs on the same features, neither decoder is finished, and the figure shows the
# first test scene of several objects as it comes, success or failure, not a chosen one.
# The attention mass says how much of each map sits on the objects the words name. It
# does not say the words are right: a caption that names one object three times can look
# at that object three times and score a high mass. Where the hard model's number is the lower one, its maps spread
# over the background instead of following the objects: the REINFORCE gradient has not
# yet taught it where to look as exactly as back-propagation taught the soft model. The grounding rows of the table are the same measure over the whole test set:
# the share of attention on the object a shape word names (mass), and how often the most
# attended region lies on it (arg-max).
#
# ## Summary
#
# - Hard attention draws one region per word, $s_t \sim \text{Multinoulli}(\alpha_t)$,
#   and trains on the lower bound $L_s \le \log p(y \mid a)$.
# - The gradient of $L_s$ has a term no back-propagation can compute — the drawn index
#   is discrete — so it is estimated by REINFORCE: reinforce the drawn locations in
#   proportion to the caption's log-likelihood.
# - A baseline leaves the estimator's mean unchanged and lowers its variance (here
#   measured on a toy with the exact gradient, and on the trained model); the entropy
#   term and the expected context for half of the captions make training steadier.
# - At test time we decode with the expected context, as the authors' code does; the
#   chapter measures the arg-max and sampled alternatives beside it.
# - `CaptionerConfig(attention="hard")` trains, checkpoints, resumes, evaluates and
#   captions with the same trainer and commands as soft attention.

# %% [markdown]
# ## Exercises
#
# Exercises 1 and 2 are tasks on a two-region toy small enough to know the exact answer:
# the score-function estimator of {eq}`eq-bound-gradient`, then the baseline of
# {eq}`eq-learning-rule`, measured. Exercise 3 is a question in words about this
# chapter's training run. The test cells say in one sentence what is wrong. The next
# cell imports what the exercises need, so this section also runs on its own, without
# the trained models (it is the chapter's nbgrader assignment: see *For instructors*).

# %%
# the exercises' imports
import torch

from caption_lib import checks

# %% [markdown]
# **Exercise 1 (task).** A "decoder" looks at region 0 or region 1 with the
# probabilities $p = \text{softmax}(\theta)$ and earns the reward $f_s$ for region $s$.
# The objective $J(\theta) = \sum_s p_s f_s$ is the toy's $L_s$. Write
# `score_function_estimate(theta, f, n, generator)`: draw `n` regions from $p$ (with
# `torch.multinomial` and `generator`) and return the mean of
# $f_s \nabla_\theta \log p_s$ over the draws, a tensor of shape `(2,)`. Derive
# $\nabla_\theta \log p_s$ for the softmax yourself first (no autograd needed). Why does
# adding the same constant to every $f_s$ leave the mean of your estimate unchanged?

# %% nbgrader={"grade": false, "grade_id": "ex1-solution", "locked": false, "schema_version": 3, "solution": true}
def score_function_estimate(theta: torch.Tensor, f: torch.Tensor, n: int,
                            generator: torch.Generator) -> torch.Tensor:
    ### BEGIN SOLUTION
    p = torch.softmax(theta, dim=0)  # (2,)
    s = torch.multinomial(p, n, replacement=True, generator=generator)  # (n,)
    score = torch.nn.functional.one_hot(s, 2).to(p.dtype) - p  # (n, 2) grad log p_s
    return (f[s].unsqueeze(1) * score).mean(dim=0)  # (2,)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex1-test", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# visible: 20,000 draws against the exact gradient of J on one toy
theta, f = torch.tensor([0.3, -0.4]), torch.tensor([-1.0, -3.0])
p = torch.softmax(theta, dim=0)
exact_grad = p * (f - (p * f).sum())  # dJ/dtheta
got = score_function_estimate(theta, f, 20000, torch.Generator().manual_seed(0))
checks.check_close(got, exact_grad, "score_function_estimate(theta, f, 20000)", atol=0.05)
### BEGIN HIDDEN TESTS
# hidden: a constant added to the rewards keeps the mean; three more toys


def _toy(g):
    return torch.randn(2, generator=g), -4 * torch.rand(2, generator=g)


checks.check_close(score_function_estimate(theta, f + 5, 40000, torch.Generator().manual_seed(1)),
                   exact_grad, "the estimate with 5 added to every reward", atol=0.06)
for trial in range(3):
    t, r = _toy(torch.Generator().manual_seed(10 + trial))
    q = torch.softmax(t, dim=0)
    checks.check_close(score_function_estimate(t, r, 40000, torch.Generator().manual_seed(trial)),
                       q * (r - (q * r).sum()), f"the estimate on toy {trial}", atol=0.05)
### END HIDDEN TESTS
checks.passed("Exercise 1")

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 1.** $\log p_s = \theta_s - \log \sum_j e^{\theta_j}$, so
# $\nabla_\theta \log p_s = e_s - p$ (one-hot minus the probabilities). Its mean under
# $p$ is $\sum_s p_s (e_s - p) = p - p = 0$, so a constant $c$ added to every reward adds
# $c \cdot 0$ to the mean: this is why a baseline is allowed at all. The usual mistakes:
# $f_s e_s$ without the $- p$ (the mean is then $p \odot f$, not the gradient), `p * f`
# without sampling (not an estimate), and drawing without `replacement=True`.

# %% [markdown]
# **Exercise 2 (task).** Measure the baseline's effect. Write
# `estimates_with_baseline(theta, f, n, b, generator)` that returns the `n` single-sample
# estimates $(f_s - b)\,\nabla_\theta \log p_s$ as an `(n, 2)` tensor (draw as in
# exercise 1, one `torch.multinomial` call). The test draws
# them with $b = 0$ and with $b = \sum_s p_s f_s$ and compares their means and variances.
# Then print the variance ratio for $b = -10$ as well, and explain: why does
# $b = \sum_s p_s f_s$ help so much on this toy, and what does a bad constant do?

# %% nbgrader={"grade": false, "grade_id": "ex2-solution", "locked": false, "schema_version": 3, "solution": true}
def estimates_with_baseline(theta: torch.Tensor, f: torch.Tensor, n: int, b: float,
                            generator: torch.Generator) -> torch.Tensor:
    ### BEGIN SOLUTION
    p = torch.softmax(theta, dim=0)  # (2,)
    s = torch.multinomial(p, n, replacement=True, generator=generator)  # (n,)
    score = torch.nn.functional.one_hot(s, 2).to(p.dtype) - p  # (n, 2)
    return (f[s] - b).unsqueeze(1) * score  # (n, 2)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex2-test", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# visible: shape; the mean kept and the variance lowered with b = sum_s p_s f_s
theta, f = torch.tensor([0.3, -0.4]), torch.tensor([-1.0, -3.0])  # exercise 1's toy
p = torch.softmax(theta, dim=0)
exact_grad = p * (f - (p * f).sum())  # dJ/dtheta
plain = estimates_with_baseline(theta, f, 20000, 0.0, torch.Generator().manual_seed(2))
good_b = float((p * f).sum())
based = estimates_with_baseline(theta, f, 20000, good_b, torch.Generator().manual_seed(2))
checks.check_shape(plain, (20000, 2), "estimates_with_baseline(theta, f, 20000, 0.0)", "(n, 2)")
checks.check_close(based.mean(0), exact_grad, "the mean of the estimates with the baseline",
                   atol=0.05)
ratio = float(plain.var(0).sum() / based.var(0).sum())
checks.check_equal(ratio > 2, True, f"variance without / with the baseline ({ratio:.2f}) > 2",
                   "a good baseline lowers the variance")
### BEGIN HIDDEN TESTS
# hidden: each estimate is (f_s - b) times the score, sample by sample
one = estimates_with_baseline(theta, f, 1, 1.5, torch.Generator().manual_seed(3))
s3 = torch.multinomial(p, 1, replacement=True, generator=torch.Generator().manual_seed(3))
want = (f[s3] - 1.5).unsqueeze(1) * (torch.nn.functional.one_hot(s3, 2).float() - p)
checks.check_close(one, want, "one estimate with b = 1.5")
### END HIDDEN TESTS
print(f"the baseline divides the variance by {ratio:.1f}")
checks.passed("Exercise 2")

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 2.** With two regions $\nabla_\theta \log p_s$ points along $(1, -1)$
# with sign $\pm$, and $(f_s - b)$ scales it. With $b = 0$ both rewards are large
# negatives, so every sample gets a big step whatever region was drawn; the mean is
# small because the steps nearly cancel: large variance. With $b = \sum_s p_s f_s$
# the better region gets a positive weight and the worse a negative one, of the size
# of the *difference* of the rewards: the cancellation is gone and the variance falls
# (by the printed ratio). $b = -10$ keeps the mean (any constant does, exercise 1) but
# makes every $|f_s - b|$ larger, so the variance rises above the $b = 0$ one. The
# paper's moving average tracks the typical reward for the same reason.

# %% [markdown]
# **Exercise 3 (written).** Which captions of a batch still send a gradient to the
# attention network (`decoder.attention`) when the hard model trains with `lambda_r=0`
# in its `CaptionerConfig`, and through which path? Read {eq}`eq-learning-rule` term by
# term. What would happen with `lambda_r=0` and `expected_prob=0`? Check your answer
# with a short run (two epochs on the cached features, as in *Training on shapes*) and
# the grounding of its captions.

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 3.** The drawn index carries no gradient, so for a sampled caption the
# attention weights only enter through the REINFORCE term ($\lambda_r$) and the entropy
# term ($\lambda_e$, which pushes towards uniform), and by the doubly stochastic
# regulariser where $\lambda > 0$ (the offline recipe has $\lambda = 0$).
# With `lambda_r=0` only the expected-context captions (half of them, `expected_prob`
# 0.5) train the attention by back-propagation, as soft attention does; the model still
# learns where to look, more slowly. With `expected_prob=0` as well, nothing rewards a
# good location: the attention is shaped only by the entropy term (and the regulariser,
# if on), which favour spread-out weights, so expect grounding near the uniform level
# (about the object's share of the 49 regions) while the decoder learns captions from the
# randomly drawn regions and the mean-region start state.

# %% [markdown]
# **Hand in.** The last cell lists the exercises whose test cell ran to its end in this
# session. On Colab, run all cells, then hand in this notebook (*File → Download →
# .ipynb*) or a copy of that list; an instructor's grader also runs hidden tests.

# %%
checks.summary({"Exercise 1": 2, "Exercise 2": 2})
