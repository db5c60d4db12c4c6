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
# # Training: teaching the model to caption
#
# **In this chapter you will learn**
#
# - the training objective: cross-entropy over real words plus the doubly stochastic
#   attention regulariser;
# - the hyper-parameters of the book's run, and why;
# - how to train on cached features, checkpoint every epoch and resume exactly;
# - how to read loss and BLEU curves, and what over-fitting looks like;
# - what pretrained features and attention buy, measured side by side.

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
# Parameters. "shapes": offline, CPU, minutes (what this book shows; the run's own times
# are printed below). "flickr8k": Colab with a GPU: downloads Flickr8k (about 1 GB) and
# ImageNet weights. No GPU time has been measured for it yet: the page "Running on Colab"
# gives estimates, labelled as such
DATASET = "shapes"
COMPARE = True  # also train the comparison models (shorter runs)
COMPARE_EPOCHS = 2  # decoder-only epochs of the attention / no-attention pair
SEED = 0

# %%
# NBVAL_IGNORE_OUTPUT
import dataclasses
import inspect
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt

import torch
import torch.nn.functional as F
from IPython.display import Code, Markdown, display

import caption_lib
from caption_lib.decoder import caption_loss, step_mask
from caption_lib.evaluate import evaluate
from caption_lib.features import workspace_features
from caption_lib.metrics import mention_errors
from caption_lib.model import Captioner
from caption_lib.train import (CachedSplit, ensure_trained, recipe, same_features_runs,
                               train_one_epoch)
from caption_lib.viz import plot_history

device = caption_lib.pick_device("auto")
BENCHMARKS = Path("../benchmarks/results")  # the experiments' curves, next to notebooks/
caption_lib.seed_everything(SEED)
if DATASET == "shapes":
    data_dir = caption_lib.ensure_shapes()
else:
    from caption_lib.download import prepare_flickr8k

    data_dir = prepare_flickr8k()
print(f"caption_lib {caption_lib.__version__} on {device}; data: {data_dir}")

# %% [markdown]
# ## The objective
#
# For an image with region features $a$ and a reference caption
# $y = (y_0{=}\texttt{<start>}, y_1, \dots, y_C{=}\texttt{<end>})$, the decoder predicts
# every word from the words before it (*teacher forcing*: during training the previous
# word is the reference word, not the model's own guess). For a batch of $B$ captions,
# caption $b$ with $C_b$ tokens after `<start>` (its words and `<end>`), $N = \sum_b C_b$, the
# loss is the Decoder chapter's
#
# $$
# L = -\frac{1}{N}\sum_{b=1}^{B}\sum_{t=1}^{C_b} \log p(y_{bt} \mid y_{b,<t}, a_b)
#     \;+\; \lambda \, \frac{1}{B}\sum_{b=1}^{B}\sum_{i=1}^{P}
#     \Bigl(1 - \sum_{t=1}^{C_b} \alpha_{bti}\Bigr)^2
# $$ (eq-objective)
#
# The first term is the cross-entropy over the real words only: padding, which makes the
# captions of a batch equally long, is masked out. The second term is the *doubly
# stochastic regularisation* of {cite:t}`xu2015show`: each $\alpha_t$ already sums to
# one over the regions; the penalty pushes the attention summed over the caption towards
# one for every region, so that the model looks at every part of the image at some point
# instead of staring at one place. $\lambda$ is `alpha_c` in the code. The offline
# recipe sets $\lambda = 0$, the Colab recipe keeps the regulariser; the settings table
# below says why.
#
# ## The book's settings
#
# `recipe("shapes")` holds the settings this book runs offline; `recipe("flickr8k")` the
# Colab ones. The offline run fine-tunes `layer4` of a randomly initialised ResNet-50
# (see the Encoder chapter); the decoder is smaller than the paper's, because the shapes
# language has only a few dozen words (chapter 1 prints its vocabulary). The flickr8k
# recipe keeps the paper's sizes, freezes the ImageNet encoder, trains on all references
# of every image and maps rare words to `<unk>`. The cell prints every setting of the
# recipe `DATASET` names; the table after it says why each has its value.

# %%
# NBVAL_CHECK_OUTPUT
model_config, config = recipe(DATASET)
for name, value in {**dataclasses.asdict(model_config), **dataclasses.asdict(config)}.items():
    print(f"{name:20s} {value}")

# %% [markdown]
# Why these values:
#
# | setting | why |
# |---|---|
# | optimiser: Adam, `lr` for the decoder, a smaller `encoder_lr` for the fine-tuned stage | the usual choice for this model; the pretrained-or-random stage below the decoder should move more slowly than the decoder on top of it. Raising the stage's rate alone, to 3 or 5 times the recipe's, learned no faster from the same seed (`benchmarks/results/recipe_encoder-lr3x.json`, `recipe_encoder-lr5x.json`); doubling the decoder's rate alone learned far slower (`recipe_decoder-lr2x__xeon-amx.json`) |
# | `ema_decay = 0.99` offline (0, off, on Flickr8k): validation, `best.pt` and everything the later chapters load use an average of the weights | not in the paper: Polyak averaging, in a bias-corrected exponential form (`caption_lib.averaging`). After every step, each trained weight's average moves a hundredth of the way towards it, so the average holds about the last hundred steps; training itself goes on from the weights it trained. One run of the recipe with the deep output, evaluated after every epoch both with its own weights and with their average, showed why: its own validation F1 swung from one epoch to the next while the loss fell, and the average's rose after every epoch up to the ninth, above the run's own from the fifth epoch on and clearly above it after the eighth (`recipe_ema__xeon-amx.json`, decays `0.99`, `0.995` and `0.998`; `0.97` and `0.98`, in `recipe_ema-short__xeon-amx.json`, ended the eighth epoch close to `0.99`; the results page shows every column). The Flickr8k recipe leaves it off: it is not measured there |
# | `deep_output = True`: the paper's output layer (Eq. 7, chapter 4) | from the same seed, eight epochs with the deep output ended at a validation F1 a little higher than with one linear layer on $h_t$, by less than the seed alone moves it (the cell below the table), and at a far higher grounding, ahead after every epoch and, from the second on, by more than the largest grounding spread between seeds (`recipe_deep-output__xeon-amx.json` against `recipe_alpha-c-0__xeon-amx.json`; the results page shows both curves). With $\hat z_t$ in the output, a colour or shape word can be read off the region in view instead of only through the LSTM's memory of the words before it. The curves cited in the rows below were measured before the recipe had it, with one output layer, except where a row says otherwise |
# | `precision = "bf16"` offline (`"auto"` on Flickr8k): the decoder's training steps run in bf16 on the CPU too | the fine-tuned stage runs under bf16 autocast in both (on a GPU the decoder too); offline the decoder's forward and loss join it on the CPU, where a CPU with bf16 instructions multiplies matrices faster in bf16 than in fp32; validation and decoding stay in fp32. Trained from two seeds on the AMD EPYC, its epochs after the first were about a twelfth shorter than those of three fp32 seeds measured the day before. From seed 0 its F1 stayed within a hundredth of their range after every epoch, and its grounding within their range or a little below it, by less than two hundredths; from seed 1 both stayed within the range or above it (`recipe_bf16-seed-0__epyc.json`, this chapter's run as it was before `encoder_epochs = 7`, scored after every epoch, and `recipe_bf16-seed-1__epyc.json`, both with `layer4` trained in all eight epochs, against the three curves of the `epochs` row; the cell below the table prints the differences; `recipe_decoder-bf16__epyc.json` is the first such curve, recorded before the library had the option). The run's grounding is the score to watch if you change this. The paper trained in fp32; bf16 keeps fp32's exponent range, so the loss needs no scaling |
# | `grad_clip` | LSTMs occasionally produce very large gradients; clipping the global norm keeps one bad batch from undoing the run |
# | $\lambda$ (`alpha_c`): 0 offline; 0.02, close to 1/49, on Flickr8k | the regulariser's minimum, for a caption of about ten words over 49 regions, is attention spread evenly (every region at about ten forty-ninths of a step), and a shapes caption names a few small objects: from the same seed, $\lambda = 0$ grounded better after every epoch than $\lambda = 0.005$ and $0.02$, and its F1 after the eighth was no lower (`recipe_alpha-c-0__xeon-amx.json`, `recipe_alpha-c-0.005__xeon-amx.json`, and `recipe_today__xeon-amx.json`, measured when the recipe had 0.02; the results page shows the curves), though by less than other seeds moved the grounding of the recipe before `references` (the cell below the table): these runs favour $\lambda = 0$ without settling it. So the offline book differs from the paper here. On Flickr8k the paper credits the regulariser with better captions (Sec. 4.2.1); the sum over regions with $\lambda = 1$ is many times the cross-entropy at 49 regions, so the Colab recipe weighs it 0.02, which is 1 on the *mean* over regions, sgrvinod's tutorial's choice |
# | `dropout` below the paper's | a small model on a simple language needs less of it. With none at all, from the same seed, F1 rose faster in the middle epochs but ended the eighth close to the recipe's, with no better grounding (`recipe_dropout-0__xeon-amx.json`, run at 1 thread beside `decoder-lr2x`), so the recipe keeps its dropout |
# | `schedule = "plateau"`, `early_stop` | both count epochs without *progress*: a better validation BLEU-4 (from real decoding, the quantity we care about) or a lower validation loss. On a small data set BLEU-4 stays 0 for the first epochs (no caption has a right 4-gram yet) while the loss falls, and BLEU-4 alone stopped such runs before they learned. The rates are lowered when progress stalls and the run stops when it stops; a short run that keeps improving keeps its rate. A cosine decay of the rates over the whole run (`schedule = "cosine"`), tried over ten epochs from the same seed, ended no higher than the plateau schedule's eight (`recipe_cosine__xeon-amx.json`, `recipe_today__xeon-amx.json`) |
# | `best_by = "bleu4"` | `best.pt` is the epoch with the best validation BLEU-4, the score the book reports. `"loss"` (the lowest validation loss) is for validation sets too small for BLEU-4 to be steady; the Colab check's small stand-in for Flickr8k uses it |
# | `bn_images` for the BatchNorm statistics | a few hundred images give every channel tens of thousands of positions, plenty for a mean and a variance, at a cost of seconds per epoch |
# | `fine_tune = "auto"`: all of `layer4` | fine-tuning only its last block, or its last two, on cached outputs of the blocks before, costs less per epoch. From the same seed, the last-block run kept up per CPU second at first and then levelled off lower (`benchmarks/results/recipe_layer4.2-bn.json`); the two-block run was stopped after three epochs (`recipe_layer4.1-bn.json`). With today's first reference, from the same seed, the two-block run (`fine_tune = "layer4.1"`) took about two thirds of the recipe's seconds per epoch and stayed level with it at equal seconds, within the seed spread, but it ended its eighth epoch, in less time than the recipe's seven, below the F1 that every seed of the recipe reached after its seventh; the last-block run levelled off far lower (`recipe_first-ref-layer4.1__epyc.json`, `recipe_first-ref-layer4.2__epyc.json` against `recipe_first-ref__epyc.json`). On today's recipe, with the decoder's steps in bf16, the two-block run was given ten epochs (frozen after the ninth) for about the recipe's seconds: its epochs were shorter, but its F1 stayed below the recipe's after every epoch and ended its tenth below the recipe's eighth (`recipe_bf16-layer4.1-enc9__epyc.json` against `recipe_bf16-enc7__epyc.json`; the last line of the cell below the table). One block more instead, the last block of `layer3` trained as well (`fine_tune = "layer3.5"`, on cached outputs of `layer3[4]`, where the objects are still twice as many regions apart), costs more per epoch and, from the same seed, ended the eighth epoch lower in F1 than the recipe from any of three seeds, with a grounding within theirs (`recipe_layer3.5__xeon-amx.json` against `recipe_today__xeon-amx-ema.json`, `recipe_seed-1__xeon-amx.json` and `recipe_seed-2__xeon-amx.json`). The results page shows every curve and compares them at equal CPU time |
# | `encoder_epochs = 7` offline (0 on Flickr8k, whose encoder is frozen): `layer4` trains in epochs 1 to 7 and is frozen for the eighth | with `encoder_epochs = N` the stage is frozen after epoch N, its output is cached once, and the later epochs train the decoder alone, each in a fraction of a fine-tuning epoch's time. On the AMD EPYC, with the decoder's steps in bf16, stopping the stage after the seventh epoch made the eighth (which also caches the stage's output) a little over half as long as a fine-tuning epoch, and from both seeds it ended the eighth epoch level in F1 with the run that trained the stage in all eight; its grounding was level from seed 0 and a little lower from seed 1 (`recipe_bf16-enc7__epyc.json`, this chapter's run scored after every epoch, and `recipe_bf16-enc7-seed-1__epyc.json`, against `recipe_bf16-seed-0__epyc.json` and `recipe_bf16-seed-1__epyc.json`; the cell below the table prints each pair). Stopping earlier saves more and costs F1: after the sixth epoch, the seventh epoch (with the caching) took about half a fine-tuning epoch and the eighth about a quarter, but while it ended level with the stage trained to the end from seed 0, from seed 1 it ended lower in F1 by more than the F1 spread of the recipe's seeds after the eighth epoch; stopping after the fifth ended lower in F1 from seed 0 too (`recipe_bf16-enc6__epyc.json`, `recipe_bf16-enc6-seed-1__epyc.json`, `recipe_bf16-enc5__epyc.json`). Stopping only the first two of `layer4`'s three blocks early (an experiment, not a library option: its last block and the decoder trained on to the seventh epoch) made those epochs shorter by more than a third, but from seed 0 it ended the eighth epoch lower in F1 than the recipe by more than the recipe's seeds lay apart after the eighth epoch, stopped after the fourth epoch or after the fifth (`recipe_bf16-blocks2-after4__epyc.json`, `recipe_bf16-blocks2-after5__epyc.json`; the cell's last lines). Earlier, on the recipe with a random reference and from one seed, with N = 4 those epochs added little F1 each, about what fine-tuning adds in the same seconds, and the curve flattened: after four epochs the features, not the decoder, limit the model (`recipe_enc4.json`); a fresh decoder trained alone on the features of the finished run levels off too (`recipe_decoder-on-today.json`; on a later default run, `recipe_decoder-on-today__xeon-amx.json`, it passed the run's own validation F1 within three epochs and then fell back while its validation loss stayed low, and one of twice the recipe's sizes learned faster at first but peaked lower, `recipe_decoder512-on-today__xeon-amx.json`: a bigger decoder is not the lever), and two decoder-only epochs after the recipe's eight did not raise F1 beyond its epoch-to-epoch noise (`recipe_enc8.json`). The option (`caption-lib train --encoder-epochs N`) is for runs whose stage has already learned enough; a longer offline run (`--epochs`) still stops `layer4` after the seventh epoch unless you raise `--encoder-epochs` with it |
# | `epochs = 8` | what the book's build can afford on a 2-core CPU. Trained from three training seeds, the recipe's validation F1 (then with the decoder in fp32 and `layer4` trained in all eight epochs) after the eighth epoch was level with the seventh's or a little above it, in every seed by less than the seeds lay apart after the seventh; its grounding moved by less than the seeds' grounding spread after the seventh in two seeds, by a little more in the third (`recipe_first-ref__epyc.json`, `recipe_seed-1__epyc.json`, `recipe_seed-2__epyc.json`, all on the AMD EPYC, with the decoder in fp32; the cell below the table prints both). Seven epochs would save the eighth epoch's seconds; a seven-epoch build (decoder steps in bf16) was tried and scored a lower test F1 than the eight-epoch one, and since the eighth epoch lowered no seed's validation F1, it stays. The longer curves were measured on earlier recipes, each with a reference drawn at random: the recipe with the deep output and without the average, continued to sixteen epochs from the same seed, did not pass the eighth epoch's validation F1: the later epochs swing below it while the validation loss goes on falling, unsteadily, and the grounding stays about where it is (`recipe_today__xeon-amx-deep-output.json`). The recipe with the average and a random reference per image, given sixteen epochs from the same seed: its validation F1 was highest after the eighth epoch and stayed near it for three more, fell back in the twelfth as the validation loss rose, and the trainer stopped early after the fourteenth (`recipe_today__xeon-amx-ema.json`). The recipe before the deep output went on improving, but unsteadily: its validation F1 climbed above its eighth epoch's, swung by several points from one epoch to the next, and its last epoch ended below its best one (`recipe_alpha-c-0__xeon-amx.json` to sixteen epochs; `recipe_today__xeon-amx.json`, with $\lambda = 0.02$, to twenty; the results page shows the curves). Starting with two epochs on the single-object scenes alone (a curriculum; those epochs are shorter) learned no faster per second (`recipe_curriculum2__xeon-amx.json`). |
# | `batch_size` images per step, `captions_per_image = 1` | an epoch sees every image once with one caption (which one: the next row). The encoder stage runs once per image however many of its references a batch uses, so more references cost decoder time only. From the same seed, two or all references per image learned more per epoch, but not clearly more per CPU second (`recipe_today.json`, `recipe_caps2.json`, `recipe_caps-all.json`). Half the batch, 16 images, with the averaged weights: every epoch took longer (smaller products use the cores less well), its validation F1 after six epochs matched the recipe's after eight in about the same time, and it fell back in the next two (`recipe_batch-16__xeon-amx.json`; the recipe's averaged curve is the `0.99` column of `recipe_ema__xeon-amx.json`). The scenes are drawn as the data set holds them, about a third each of one, two and three objects. Drawing each epoch's images in proportion to their number of objects instead (half of them three-object scenes, where chapter 6 finds the failures) taught a fresh decoder on the default run's frozen encoder no more: from the same seed its F1 and grounding stayed within the seed spread below of the usual draw's after every epoch (`recipe_mix-on-today__epyc.json` against `recipe_decoder-on-today__epyc.json`, both run on an AMD EPYC CPU, the `__xeon-amx` curves on an Intel Xeon) |
# | `references = "first"` offline (`"random"` on Flickr8k): every epoch, each image trains on its first reference, the canonical caption of chapter 1 | not in the paper, which trains on every reference. A shapes image's five references say one scene in several forms (a chain with sizes and relations, a list, no sizes, right to left), and greedy decoding must commit to one form at the first word; trained on a reference drawn at random, the model learns all the forms and spreads its probability over them. On the canonical form alone, a fresh decoder on the frozen encoder of a default run of the previous recipe, from the same seed, reached a higher F1 and grounded better after every epoch than with the random draw (`recipe_first-ref-on-today__epyc.json` against `recipe_decoder-on-today__epyc.json`). The whole recipe with it, from the same seed, was ahead of all three seeds of the previous recipe in F1 after every epoch and in grounding from the second on: by more than the seeds' largest spread in both from the second epoch to the seventh, and after the eighth in grounding only, where the previous recipe's F1 has come within the spread of it (`recipe_first-ref__epyc.json`, run on the AMD EPYC, the seeds on the Intel Xeon; the cell below the table prints the lead after every epoch). The other references stay in the data set: validation and test score BLEU against all five. Flickr8k's first caption is one annotator's among five, no more canonical than the others, so that recipe draws at random |
#
# Each curve cited in the table is one run from one seed, and the seed alone moves a curve.
# The recipe with the first reference (its decoder then in fp32) and the recipe as it was
# before `references = "first"` were each trained from two more training seeds (another
# decoder initialisation, data order and dropout; the same random encoder), and today's,
# with the decoder's steps in bf16, from one more, with `layer4` trained in all eight
# epochs and stopped after the seventh (and sixth); the rows above compare with the recipe
# before, except the `precision`, `encoder_epochs`, `epochs` and `references` rows. The
# cell below prints how far apart the seeds' curves lay after the same epoch (the highest
# minus the lowest): a difference between two settings smaller than that is not evidence
# for either.

# %%
# NBVAL_IGNORE_OUTPUT
TODAY = ["recipe_first-ref__epyc.json", "recipe_seed-1__epyc.json",
         "recipe_seed-2__epyc.json"]  # references="first", decoder in fp32, 8 epochs
BEFORE = ["recipe_today__xeon-amx-ema.json", "recipe_seed-1__xeon-amx.json",
          "recipe_seed-2__xeon-amx.json"]  # the recipe before references="first"
BF16_SEEDS = ["recipe_bf16-seed-0__epyc.json",  # the recipe with layer4 in all 8 epochs
              "recipe_bf16-seed-1__epyc.json"]  # (encoder_epochs 0), seeds 0 and 1
FROZEN = {  # (stage frozen after epoch N, seed): its curve, and the same seed's in all 8
    (after, seed): (f"recipe_bf16-enc{after}{'-seed-1' if seed else ''}__epyc.json",
                    BF16_SEEDS[seed]) for after, seed in ((5, 0), (6, 0), (7, 0), (6, 1), (7, 1))}
FROZEN_FILES = [name for pair in FROZEN.values() for name in pair]
# layer4's last two blocks only (fine_tune="layer4.1", frozen after epoch 9 of 10) against
# the recipe, bf16 decoder steps, seed 0
TWO_BLOCKS = ["recipe_bf16-layer4.1-enc9__epyc.json", "recipe_bf16-enc7__epyc.json"]
# layer4's first two blocks stopped after epoch N (an experiment, not a library option)
PARTLY = {after: f"recipe_bf16-blocks2-after{after}__epyc.json" for after in (4, 5)}
CURVES = TODAY + BEFORE + BF16_SEEDS + FROZEN_FILES + TWO_BLOCKS + list(PARTLY.values())
records = {n: json.loads((BENCHMARKS / n).read_text())
           for n in dict.fromkeys(CURVES) if (BENCHMARKS / n).is_file()}  # each read once


def seed_of(name: str) -> int:
    return records[name]["settings"]["train"]["seed"]


def seed_curves(names: list[str]) -> tuple[list[int], list[list[float]], list[list[float]]]:
    """The training seeds of the curves `names` (from `records`) and their validation F1
    and grounding (mass): one row per epoch that every seed has."""
    rows = list(zip(*(records[n]["epochs"] for n in names)))
    return ([seed_of(n) for n in names],
            [[e["val_semantic_f1_all"] for e in row] for row in rows],
            [[e["val_grounding_mass"] for e in row] for row in rows])


def spreads(rows: list[list[float]]) -> list[float]:
    """Per epoch: the highest minus the lowest seed."""
    return [max(v) - min(v) for v in rows]


def seed_line(label: str, seeds: list[int], f1: list, ground: list) -> str:
    return (f"{label}: seeds {seeds}, epochs 1-{len(f1)}: F1 spread up to "
            f"{max(spreads(f1)):.3f}, grounding (mass) up to {max(spreads(ground)):.3f}; after "
            f"epoch {len(f1)} F1 {min(f1[-1]):.3f}-{max(f1[-1]):.3f}, grounding "
            f"{min(ground[-1]):.3f}-{max(ground[-1]):.3f}")


if len(records) == len(set(CURVES)):
    today, before = seed_curves(TODAY), seed_curves(BEFORE)
    print(seed_line("references='first', decoder in fp32 (AMD EPYC)", *today))
    print(seed_line("the recipe before references='first' (Intel Xeon)", *before))
    seeds, f1, ground = today
    e = len(f1) - 1  # the last epoch but one
    print(f"those seeds after epoch {e}: F1 {min(f1[e - 1]):.3f}-{max(f1[e - 1]):.3f}"
          f" (spread {spreads(f1)[e - 1]:.3f}), grounding {min(ground[e - 1]):.3f}-"
          f"{max(ground[e - 1]):.3f} (spread {spreads(ground)[e - 1]:.3f}); "
          f"epoch {e + 1} minus epoch {e}, per seed: F1 "
          + ", ".join(f"{b - a:+.3f}" for a, b in zip(f1[e - 1], f1[e])) + "; grounding "
          + ", ".join(f"{b - a:+.3f}" for a, b in zip(ground[e - 1], ground[e])))
    for name in BF16_SEEDS:
        bf16 = records[name]["epochs"]
        outside = {n: [v - max(row) if v > max(row) else v - min(row) if v < min(row) else 0.0
                       for v, row in zip((ep[key] for ep in bf16), rows)]
                   for n, key, rows in (("F1", "val_semantic_f1_all", f1),
                                        ("grounding", "val_grounding_mass", ground))}
        print(f"decoder in bf16, layer4 in all 8 epochs, seed {seed_of(name)}, outside those "
              "seeds' range after each epoch (0: inside): "
              + "; ".join(f"{n} " + ", ".join(f"{d:+.3f}" for d in v) for n, v in outside.items()))
    seconds = [ep["seconds"] for n in BF16_SEEDS for ep in records[n]["epochs"][1:]]
    fp32_seconds = [ep["seconds"] for n in TODAY for ep in records[n]["epochs"][1:]]
    print(f"seconds per epoch after the first: bf16 decoder {sum(seconds) / len(seconds):.1f}"
          f", fp32 seeds {sum(fp32_seconds) / len(fp32_seconds):.1f}")
    _, f1_before, ground_before = before  # the first reference's lead, seed 0 of each
    f1_lead = [v[0] - max(w) for v, w in zip(f1, f1_before)]
    ground_lead = [v[0] - max(w) for v, w in zip(ground, ground_before)]
    print(f"references='first', seed 0, minus the best seed of the recipe before it, epochs "
          f"1-{len(f1_lead)}: F1 {', '.join(f'{d:+.3f}' for d in f1_lead)}; "
          f"grounding {', '.join(f'{d:+.3f}' for d in ground_lead)}")
    beyond = [i + 1 for i, (a, b) in enumerate(zip(f1_lead, ground_lead))
              if a > max(spreads(f1_before)) and b > max(spreads(ground_before))]
    print("epochs where it leads by more than those seeds' largest spread in both: "
          f"{beyond or 'none'}")
    for (after, seed), (name, whole) in FROZEN.items():  # encoder_epochs, epochs 1-8
        mine, theirs = records[name]["epochs"][:8], records[whole]["epochs"][:8]
        print(f"decoder in bf16, layer4 frozen after epoch {after} against trained in all "
              f"8, seed {seed}, after epoch 8: F1 {mine[-1]['val_semantic_f1_all']:.3f} vs "
              f"{theirs[-1]['val_semantic_f1_all']:.3f}, grounding "
              f"{mine[-1]['val_grounding_mass']:.3f} vs {theirs[-1]['val_grounding_mass']:.3f}; "
              f"seconds of epochs 1-8 {sum(e['seconds'] for e in mine):.0f} vs "
              f"{sum(e['seconds'] for e in theirs):.0f}; seconds of epoch {after + 1} (caching "
              f"the stage's output) and after: "
              + ", ".join(f"{e['seconds']:.0f}" for e in mine[after:]))
    two, whole = (records[n] for n in TWO_BLOCKS)

    def stage_epoch_seconds(record: dict) -> float:
        """Mean seconds of the epochs that train the stage (before `encoder_epochs` ends)."""
        epochs = record["epochs"][:record["settings"]["train"]["encoder_epochs"]]
        return sum(e["seconds"] for e in epochs) / len(epochs)

    print("decoder in bf16, layer4's last two blocks trained (fine_tune='layer4.1'), frozen "
          "after epoch 9 of 10, against the recipe, seed 0: F1 "
          + ", ".join(f"{e['val_semantic_f1_all']:.3f}" for e in two["epochs"]) + " vs "
          + ", ".join(f"{e['val_semantic_f1_all']:.3f}" for e in whole["epochs"])
          + f"; seconds per epoch that trains the stage {stage_epoch_seconds(two):.1f}"
          f" vs {stage_epoch_seconds(whole):.1f}; all epochs "
          + " vs ".join(f"{sum(e['seconds'] for e in r['epochs']):.0f}" for r in (two, whole))
          + " s, plus making each one's cache "
          + " vs ".join(f"{r['cache']['extraction_seconds']:.0f}" for r in (two, whole)) + " s")
    for after, name in PARTLY.items():
        mine = records[name]["epochs"]
        print(f"decoder in bf16, layer4's first two blocks stopped after epoch {after} (its last "
              "block to epoch 7), against the recipe, seed 0, after epoch 8: F1 "
              f"{mine[-1]['val_semantic_f1_all']:.3f} vs {whole['epochs'][-1]['val_semantic_f1_all']:.3f}"
              f", grounding {mine[-1]['val_grounding_mass']:.3f} vs "
              f"{whole['epochs'][-1]['val_grounding_mass']:.3f}; seconds of epochs "
              f"{after + 1}-7 " + ", ".join(f"{e['seconds']:.0f}" for e in mine[after:7])
              + " vs " + ", ".join(f"{e['seconds']:.0f}" for e in whole["epochs"][after:7]))
else:
    print("the seed curves are not here (on Colab): they live in the repository's benchmarks/results/")

# %% [markdown]
# So F1 differences of a few hundredths and grounding differences of several hundredths,
# even when they hold after every epoch, can be the seed's doing; the rows above that rest
# on such differences say so. The first-reference recipe varies with the seed as much
# early in the run and less at its end: after the seventh epoch its three seeds lay within two
# hundredths of one another in F1 and about one in grounding. The first reference's lead
# (the last two lines) is of another size: larger than the previous recipe's seed spread
# in both scores for most of the run, and in grounding to the end.
#
# ## The training loop
#
# Everything `train` does per epoch happens in one library function, `train_one_epoch`.
# Here is its source, exactly as the trainer runs it:

# %%
display(Code(inspect.getsource(train_one_epoch), language="python"))

# %% [markdown]
# Line by line:
#
# - `model.train()` switches dropout on (and the fine-tuned `layer4`'s BatchNorm to batch
#   statistics).
# - `loss_fn` is `model.cached_loss`: it finishes the encoder on the cached `layer3`
#   output of each image of the batch (the frozen part never runs: chapter 2's feature
#   cache), gives each caption its image's region features (`batch.owner`), runs the
#   decoder with teacher forcing and returns the loss of {eq}`eq-objective` with its parts
#   (`"xent"`, `"reg"`, `"tokens"`). Under `torchrun` the trainer passes a
#   `DistributedDataParallel` wrapper of the same method instead, and `batch.weights`
#   make each process's loss its share of the global batch's; for one process they are
#   `None`.
# - `scaler` matters only for fp16 on older GPUs (it scales the loss so small gradients
#   survive fp16); here it does nothing. `params` are the weights the optimiser updates:
#   the decoder and the fine-tuned encoder stage.
# - `autocast(...)` runs the decoder in bf16 on a GPU; on the CPU only with
#   `precision = "bf16"` (the offline recipe's; see the table above), otherwise it does
#   nothing there (the encoder stage has its own bf16 autocast inside `cached_loss`).
# - A loss that is not finite stops the run with one clear line instead of training on.
# - `zero_grad`, `backward()`: the gradient of the loss with respect to every weight.
# - `clip_grad_norm_` rescales the gradient when its norm exceeds `grad_clip`:
#   LSTMs occasionally produce a very large one.
# - `step()` is Adam's update; a cosine schedule would also step here, once per batch.
# - `average.update()`: with `ema_decay` (the offline recipe sets it; see the table above)
#   an exponential moving average of every trained weight follows it after each step
#   (`caption_lib.averaging`); validation and both checkpoints use the average, and
#   training goes on from the trained weights. The demo below passes none.
# - The returned sum of cross-entropies and the number of real tokens give the epoch's
#   training loss (their ratio) that the history reports.
#
# Before the full run, three steps of it on the real data: a fresh model of the book's
# settings, the first batches of an epoch (32 images with one caption each), the loss
# printed after every step. The features come from the same cache the full run uses.

# %%
# NBVAL_IGNORE_OUTPUT
records = caption_lib.load_dataset(data_dir)
train_records = caption_lib.split_records(records, "train")
vocab = caption_lib.Vocabulary.build([c for r in train_records for c in r.captions],
                                     min_freq=config.min_freq)
torch.manual_seed(SEED)
fresh = Captioner(vocab, model_config).to(device)
store = workspace_features(fresh.encoder, train_records, device=device, progress=False)
split = CachedSplit(train_records, store, vocab, config.max_caption_len)
optimizer = torch.optim.Adam([
    {"params": fresh.decoder.parameters(), "lr": config.lr},
    {"params": fresh.encoder.trainable.parameters(), "lr": config.encoder_lr}])
epoch = split.epoch_batches(config.batch_size, config.captions_per_image,
                            torch.Generator().manual_seed(SEED), config.references)
first_batch = split.batch(epoch[0])
print("a batch:", tuple(first_batch.cached.shape), "cached,", tuple(first_batch.captions.shape),
      "captions")
demo_losses = []
for step, pairs in enumerate(epoch[:3], start=1):
    total, tokens = train_one_epoch(fresh, [split.batch(pairs)], optimizer, config, device)
    demo_losses.append(total / tokens)
    print(f"step {step}: loss {demo_losses[-1]:.3f} over {tokens:.0f} words")
assert all(math.isfinite(x) for x in demo_losses)
assert demo_losses[-1] < demo_losses[0], "three steps lower the loss"

# %% [markdown]
# The loss starts near $\log V$, the cross-entropy of a uniform guess over the vocabulary
# (printed below), and is lower after the third step than after the first. It need not
# fall at every step: each step scores other captions, and one batch can be harder than
# the one before. `train` repeats exactly this, epoch after epoch, with validation and
# checkpoints around it.

# %%
# NBVAL_IGNORE_OUTPUT
print(f"log V = log {len(vocab)} = {math.log(len(vocab)):.3f}")
del fresh, optimizer, store, split

# %% [markdown]
# ## Training
#
# `ensure_trained` trains and checkpoints after every epoch (`last.pt`, and `best.pt`
# for the best validation BLEU-4). It also makes the chapter cheap to re-run: a finished
# run with the same settings is loaded instead of trained again, and an interrupted one
# continues where it stopped. Each epoch prints the training loss, the validation loss
# (teacher forcing), and BLEU-4 and semantic F1 of *greedy decoding* on the validation
# images — no teacher forcing there. With the offline recipe's `ema_decay`, everything
# validated and both checkpoints are the *averaged* weights (the settings table says
# why); the training loss is that of the weights being trained, measured as they train.

# %%
# NBVAL_IGNORE_OUTPUT
result = ensure_trained(data_dir, model_config, config, device=device)

# %% [markdown]
# The run's history, one row per epoch (times are this build machine's):

# %%
# NBVAL_IGNORE_OUTPUT
columns = ["epoch", "train_loss", "val_loss", "val_bleu4", "val_semantic_f1", "lr", "seconds"]
columns = [c for c in columns if c in result.history[-1]]  # no semantic F1 without ground truth
lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
for row in result.history:
    lines.append("| " + " | ".join(f"{row.get(c, float('nan')):.4g}" for c in columns) + " |")
display(Markdown("\n".join(lines)))
print(f"total training time: {sum(h['seconds'] for h in result.history):.0f} s")
if len(result.history) > 1:  # the last epoch against the one before
    last, before = result.history[-1], result.history[-2]
    print("last epoch against the one before: " + ", ".join(
        f"{c} {last[c] - before[c]:+.4f}"
        for c in ("train_loss", "val_loss", "val_bleu4", "val_semantic_f1")
        if c in last))

# %% mystnb={"image": {"alt": "Training curves of the book's run: training and validation loss, validation BLEU-4 and semantic F1 per epoch"}}
# The library draws plain matplotlib figures (no pyplot): show them inline with `display`
# %matplotlib inline
display(plot_history(result.history, title=f"Training on {DATASET}"))

# %% [markdown]
# **Reading the curves.** The training loss falls over the run, though not necessarily
# in every epoch: it is measured while the weights move, with dropout on. The validation
# loss follows it
# as long as the model learns things that hold for new images; when the model starts to
# memorise its training captions, the validation loss turns up while the training loss
# keeps falling — that is over-fitting, and the point where the validation curve bottoms
# out is where `best.pt` should come from. Validation BLEU-4, computed from the model's
# own captions, is the more honest signal: a lower loss does not always mean better
# sentences. On the shapes data set the language is simple and 3,000 images are plenty,
# so a lasting turn of the validation loss shows only after more epochs than the book runs
# (the longer curves of the `epochs` row in the settings table). The last printed line
# compares the last epoch with the one before: a validation loss a little up while BLEU-4
# and F1 still rise is one epoch's noise in the loss, not yet that turn, and the captions
# the model writes were still getting better.
#
# With the offline recipe the last epoch is the odd one, in time and in training loss.
# The recipe stops training `layer4` after the seventh epoch (`encoder_epochs`, settings
# table), so the eighth caches the stage's output once and trains the decoder alone: it
# is the short row of the table. Its training loss drops far below the epoch before's (the first number of the
# last line) while the validation scores barely move. Until then the loss was measured on
# a stage in training mode: its BatchNorm normalised every batch by that batch's own
# statistics, and its weights changed under the decoder at every step. In the eighth
# epoch each training image has one fixed feature map, computed the way validation
# computes it, and the decoder fits its training captions more closely. That lower
# training loss says nothing about new images; the validation columns do.
#
# ## Averaging the weights
#
# With the offline recipe, the validation columns above score an *average* of the
# weights, not the weights after the epoch's last step (`ema_decay` in the settings
# table; not in the paper). After step $t$, with $w_t$ the weights training has reached
# and $d$ the decay,
#
# $$
# S_t = d\,S_{t-1} + (1 - d)\,w_t, \quad S_0 = 0, \qquad
# \bar w_t = \frac{S_t}{1 - d^{\,t}}.
# $$ (eq-ema)
#
# Step $s$ gets the share $(1 - d)\,d^{\,t-s}$ of $S_t$, so a step's share shrinks by the
# factor $d$ with every newer step: the average holds about the last $1/(1 - d)$ steps.
# The shares of the steps so far add up to $1 - d^{\,t}$, and dividing by that (the bias
# correction Adam uses for its moment estimates) makes $\bar w_t$ a weighted mean of
# $w_1, \dots, w_t$ from the first step on, with nothing left of $S_0$. Training goes on
# from $w_t$; $\bar w_t$ is what is validated, saved and used by the later chapters
# (`caption_lib.averaging`).
#
# Why: the figure scores one run of the recipe, before it averaged, after every epoch on
# the whole validation split, twice: with its own weights and with their average
# (`benchmarks/results/recipe_ema__xeon-amx.json`, from the experiment that chose the
# setting; the results page has the numbers).

# %% mystnb={"image": {"alt": "Validation semantic F1 per epoch of one run, scored with its own weights and with averages of them: the run's own curve swings from epoch to epoch, the 0.99 average rises to the eighth epoch and stays near its best"}}
# NBVAL_IGNORE_OUTPUT
from matplotlib.figure import Figure

ema_path = BENCHMARKS / "recipe_ema__xeon-amx.json"
if ema_path.is_file():
    ema_curve = json.loads(ema_path.read_text())["epochs"]
    own = [e["val_semantic_f1_all"] for e in ema_curve]
    averaged = {d: [e["ema"][d]["val_semantic_f1_all"] for e in ema_curve]
                for d in ema_curve[0]["ema"]}
    fig = Figure(figsize=(6.5, 3.4), layout="constrained")
    ax = fig.add_subplot()
    epochs_axis = range(1, len(own) + 1)
    ax.plot(epochs_axis, own, marker="o", label="the run's own weights")
    for d, values in averaged.items():
        ax.plot(epochs_axis, values, marker=".", linestyle="--", label=f"average, d = {d}")
    ax.set(xlabel="epoch", ylabel="validation semantic F1", title="One run, scored two ways")
    ax.legend()
    ax.grid(alpha=0.3)
    display(fig)

    def worst_fall(values: list[float]) -> str:
        fall = min(b - a for a, b in zip(values, values[1:]))
        return f"{fall:+.3f}" if fall < 0 else "none (it never fell)"

    # the offline recipe's last epoch (a recipe changed by CAPTION_LIB_RECIPE_OVERRIDES
    # may ask for more epochs than the curve has: then its last one)
    offline_epochs = recipe("shapes")[1].epochs
    shapes_epochs = min(offline_epochs, len(own))
    which = "the offline recipe's last" if shapes_epochs == offline_epochs else "the curve's last"
    at_end = {d: values[shapes_epochs - 1] for d, values in averaged.items()}
    top = max(at_end, key=at_end.get)
    print("largest fall from one epoch to the next: own weights "
          f"{worst_fall(own)}; " + ", ".join(f"average d = {d} {worst_fall(v)}"
                                                 for d, v in averaged.items()))
    print(f"after epoch {shapes_epochs} ({which}): own weights "
          f"{own[shapes_epochs - 1]:.3f}; " + ", ".join(f"average d = {d} {v:.3f}"
                                                       for d, v in at_end.items())
          + f"; highest: d = {top}")
else:
    print(f"{ema_path}: not in this checkout (the figure needs the repository's benchmarks/)")

# %% [markdown]
# Read the figure with the printed lines. The run's own weights rise and fall from one
# epoch to the next (the first line gives each curve's largest fall): each epoch ends at
# another point of the noisy path the steps take, and greedy decoding, one word at a
# time, is sensitive to small changes of the weights. An average sits near the middle
# of its last $1/(1 - d)$ steps. Early in a run the long averages lag behind: they still
# hold weights from epochs when the model knew less, so a larger $d$ starts lower. The
# recipe takes the decay that scored highest after its own last epoch (the second line).
# These averages started from the initial weights (the experiment ran before the library
# had the bias correction above), which pulls the long ones down further in the first
# epochs: for $d$ = `0.99` the initial weights' share is below one percent by the fifth
# epoch, for the longer averages it lasts longer, so their early points are lower than
# {eq}`eq-ema` would give.
#
# ## Resuming
#
# Every epoch ends with `last.pt`: the model, the optimiser's state, the schedule, the
# history and the state of the random number generator. With `ema_decay`, the model in
# the file is the average, and the weights training goes on from are stored beside it
# (`trained_weights`), with the number of steps averaged so far (`average_steps`). `train(..., resume=True)`
# continues from it, and the next epochs are exactly those an uninterrupted run would
# have produced (the tests check it, loss for loss). `ensure_trained` above resumed
# automatically; from the command line:
#
# ```bash
# caption-lib train --data DIR --out RUN_DIR            # Ctrl-C at any time, then
# caption-lib train --data DIR --out RUN_DIR --resume   # continues from RUN_DIR/last.pt
# ```

# %%
# NBVAL_CHECK_OUTPUT
checkpoint = Captioner.load(result.out_dir / "last.pt")
print("epochs in last.pt:", checkpoint.extra["epoch"] == len(result.history))
print("stored:", sorted(k for k in checkpoint.extra if k != "data_dir"))

# %% [markdown]
# ## How good is it? The test set
#
# The real test: captions generated by greedy decoding for the test images, which the
# model never saw, scored against their references. On shapes, semantic F1 checks that
# the caption names the right (colour, shape) pairs, and grounding measures how much
# attention the model puts on the object whose shape word it writes (both 0–1; see the
# Inference chapter). A data set without per-object ground truth (Flickr8k) has neither:
# they print "n/a".

# %%
# NBVAL_IGNORE_OUTPUT
best = Captioner.load(result.out_dir / "best.pt", map_location=device)
test = evaluate(best, data_dir, "test", beam_size=1, meteor=False, device=device,
                progress=False)  # no bar in the published page
for key in ["bleu1", "bleu4", "cider", "rougeL", "semantic_f1", "grounding"]:
    print(f"{key:12s} " + (f"{test.scores[key]:.3f}" if key in test.scores else "n/a"))

# %%
# a loose floor: an untrained or broken pipeline fails here (see the figures above)
assert test.scores["bleu4"] > 10
assert "semantic_f1" not in test.scores or test.scores["semantic_f1"] > 0.25
for item in test.captions[:5]:
    print(f"{item['caption']:55s} | reference: {item['references'][0]}")
scenes = {str(r.image): r.objects for r in records if r.split == "test"}
for k, item in enumerate(test.captions[:5], start=1):  # shapes: what each names vs the scene
    if scenes.get(item["image"]):
        wrong, missed = mention_errors(item["caption"], scenes[item["image"]])
        print(f"caption {k}: " + (f"names {wrong}, misses {missed}" if wrong or missed
                                  else "names the scene's objects"))

# %% [markdown]
# Above: the first five test captions, each beside one of its references, and on shapes
# a line per caption that compares the (colour, shape) pairs it names with the objects in
# the picture. Read them as a sample, not as a score. Where a caption differs from the
# reference shown, it is either another way to say the same thing (every image has
# several references) or a mistake; the lines below the captions say which. On shapes,
# semantic F1 counts the mistakes in colour and shape: a wrong shape, a missed object, an
# object named twice. It ignores size words, and the words that place the objects
# ("above", "below", "and").
#
# ## What pretrained features and attention buy
#
# Three more models, trained on the same data:
#
# - **frozen encoder**: no stage of the ResNet-50 is trained. Offline (random weights) it
#   is the frozen random encoder, the setting that works with ImageNet weights but not
#   without them; on Colab, where the main run is already the frozen ImageNet encoder,
#   this row is a frozen *random-init* one instead: what the pretrained weights bring.
#   It gets 2 epochs (the "epochs" column): it learns next to nothing, and more epochs
#   do not change that.
# - **attention** and **no attention** ("Show and Tell"-style, {cite:t}`vinyals2015show`):
#   two decoders trained on *identical* features, the main run's encoder, frozen, so
#   that the one difference between them is attention. The no-attention decoder sees the
#   *mean* of the 49 region features at every step instead of an attention-weighted one.
#   Both train `COMPARE_EPOCHS` epochs, decoder only, from the same seed. The Hard
#   attention chapter's soft decoder is this same attention run (the same run folder).
#
# Why not two whole runs, each fine-tuning its own encoder? That comparison mixes two
# effects, attention and how well each decoder shapes its encoder. It also costs as much
# as the main run again. The price of this design: the main run's encoder was fine-tuned
# together with an attention decoder, so its features may suit attention better than
# features tuned for a mean-pooling decoder would. The labels name the weights and
# stages each model used.

# %%
# NBVAL_IGNORE_OUTPUT
def describe(model: Captioner) -> str:
    """What a trained model is, read from the model itself."""
    encoder = model.encoder
    return (f"{encoder.weights_used} encoder, {'+'.join(encoder.trained_stages) or 'nothing'} "
            f"fine-tuned, {'attention' if model.config.use_attention else 'no attention'}")


main_label = describe(result.model) + " (main run)"
runs = {main_label: (test.scores, result.history)}
if COMPARE:
    frozen_config = (dataclasses.replace(model_config, encoder_weights=None, fine_tune=False)
                     if result.model.encoder.pretrained  # ImageNet: what random weights give
                     else dataclasses.replace(model_config, fine_tune=False))  # random: frozen
    variants = {"frozen encoder": (frozen_config, dataclasses.replace(config, epochs=2))}
    pair = same_features_runs(result.out_dir, model_config, config, COMPARE_EPOCHS,
                              decoders=("soft", "none"))
    variants["attention, main run's encoder frozen"] = pair["soft"]
    variants["no attention, main run's encoder frozen"] = pair["none"]
    labels = {}
    for name, (variant, budget) in variants.items():
        run = ensure_trained(data_dir, variant, budget, device=device, progress=False)
        model = Captioner.load(run.out_dir / "best.pt", map_location=device)
        scores = evaluate(model, data_dir, "test", meteor=False, device=device,
                          progress=False).scores
        labels[name] = name if "main run's encoder" in name else describe(model)
        runs[labels[name]] = (scores, run.history)


def cell(scores: dict, key: str, fmt: str) -> str:
    return "n/a" if scores.get(key) is None else format(scores[key], fmt)


lines = ["| model | epochs | BLEU-4 | semantic F1 | grounding |", "|---|---|---|---|---|"]
for label, (scores, history) in runs.items():
    ground = ("n/a (no attention map)" if label.startswith("no attention")
              or label.endswith("no attention") else cell(scores, "grounding", ".3f"))
    lines.append(f"| {label} | {len(history)} | {cell(scores, 'bleu4', '.1f')} | "
                 f"{cell(scores, 'semantic_f1', '.3f')} | {ground} |")
display(Markdown("\n".join(lines)))
if COMPARE:
    with_att, without = (runs[labels[n]] for n in list(variants)[1:])
    gap = {key: with_att[0].get(key, math.nan) - without[0].get(key, math.nan)
           for key in ("bleu4", "semantic_f1")}
    signs = {math.copysign(1, v) for v in gap.values() if v == v and v != 0}
    verdict = {frozenset({1.0}): "ahead", frozenset({-1.0}): "behind"}.get(frozenset(signs), "mixed")
    print(f"attention minus no attention, same features and budget (test split): "
          f"BLEU-4 {gap['bleu4']:+.1f}, semantic F1 {gap['semantic_f1']:+.3f}: "
          f"with attention the decoder is {verdict}")
    if "val_semantic_f1" in with_att[1][-1]:  # shapes: per-object ground truth
        print("validation semantic F1 per epoch, attention vs no attention:")
        gaps = []
        for a, b in zip(with_att[1], without[1]):
            print(f"  epoch {a['epoch']}: {a['val_semantic_f1']:.3f} vs {b['val_semantic_f1']:.3f}")
            gaps.append(a["val_semantic_f1"] - b["val_semantic_f1"])
        print(f"the gap is {gaps[0]:+.3f} after epoch 1 and {gaps[-1]:+.3f} after epoch "
              f"{len(gaps)}: it {'grows' if gaps[-1] > gaps[0] else 'does not grow'} with training")

# %% [markdown]
# What the table shows offline, on shapes (the figures come from this build's runs; the
# line under the table subtracts the no-attention row from the attention row, on the
# same features):
#
# - **Frozen random encoder**: the decoder learns next to nothing (its grounding reads 0
#   because it writes no shape word that names an object: there is nothing to ground). The features of an
#   untrained ResNet-50 are not only uninformative but badly scaled: its BatchNorm layers
#   hold their initial statistics, so activations grow through the residual blocks (the
#   cell below measures their size, against the fine-tuned stage's), which saturates the
#   attention's tanh and the LSTM's gates. Fine-tuning `layer4` (with its BatchNorm in
#   train mode) fixes both.
# - **Attention vs no attention on the same features**: the lines under the table say
#   which decoder wins in this build, by how much on the test split, and whether the gap
#   in validation F1 grows with training. One averaged vector can carry "which colours and shapes are in
#   the picture"; what it cannot do is look at one object per word, and that is what a
#   scene of several objects needs to bind each colour to its shape and place (the
#   Inference chapter counts where the remaining mistakes are: nearly all in scenes of
#   several objects).
#   Grounding is not defined without attention: there is no attention map. If a rerun
#   shows the no-attention decoder level or ahead, the printed figures are the ones to
#   believe, not this explanation.
# - The two decoder-only rows are not the main run: they trained fewer epochs on an
#   encoder that no longer changes. Compare them with each other, not with the main row.
# - With ImageNet weights on Colab, the frozen encoder of the paper is the strong one —
#   set `DATASET = "flickr8k"` there, and the table then compares it with a frozen
#   random-init encoder: what ImageNet pretraining brings.

# %%
# NBVAL_IGNORE_OUTPUT
if COMPARE and DATASET == "shapes":
    frozen = Captioner.load(ensure_trained(data_dir, *variants["frozen encoder"], device=device,
                                           progress=False, log=lambda *_: None).out_dir / "best.pt",
                            map_location=device).eval()
    main_model = Captioner.load(result.out_dir / "best.pt", map_location=device).eval()
    probe = caption_lib.load_dataset(data_dir)[:16]
    with torch.no_grad():
        for name, m in [("frozen random encoder", frozen), ("fine-tuned stage", main_model)]:
            store = workspace_features(m.encoder, probe, device=device, progress=False)
            feats = m.encode_cached(store[torch.arange(len(probe))])  # (B, 49, 2048)
            print(f"{name:22s} mean |feature| = {feats.abs().mean():.2f}")

# %% [markdown]
# The book's offline run is short (minutes on two CPU cores): the last rows of the
# history above show whether validation F1 was still rising at the last epoch; if it was,
# training longer (`config.epochs`) is the first thing to try.
#
# ## Summary
#
# - Training minimises the cross-entropy of the reference words under teacher forcing,
#   plus $\lambda\sum_i(1-\sum_t\alpha_{ti})^2$ so that attention covers the image
#   (the Colab recipe; offline $\lambda = 0$, which grounds better on shapes).
# - Padding is masked out of the loss; the frozen encoder's output comes from the cache.
# - Validation uses real greedy decoding; the learning rate and early stopping follow
#   progress (a better validation BLEU-4 or a lower validation loss); `best.pt` keeps the
#   epoch of the best BLEU-4, `last.pt` the latest. Offline, what is validated and kept
#   is an average of the weights over the last steps (`ema_decay`; not in the paper).
# - Checkpoints hold state dicts, configs and the vocabulary as JSON; resuming restores
#   the optimiser, the random generator and (with averaging) the trained weights, so it
#   reproduces the uninterrupted run.

# %% [markdown]
# ## Exercises
#
# Exercise 1 is a task that needs thought: the paper's regulariser over captions of
# different lengths. Exercise 2 is a quick check, exercise 3 a question in words. The
# test cells say in one sentence what is wrong. The next cell imports what the exercises
# need, so this section also runs on its own, without the trained model (it is the
# chapter's nbgrader assignment: see *For instructors*).

# %%
# the exercises' imports
import torch

from caption_lib import checks
from caption_lib.decoder import step_mask

# %% [markdown]
# **Exercise 1 (task).** Write `attention_penalty(alphas, mask, lam)`, the doubly
# stochastic regulariser of {eq}`eq-loss` (the paper's Sec. 4.2.1):
# $\lambda \cdot \frac{1}{B}\sum_b \sum_i \big(1 - \sum_{t\ \text{real}} \alpha_{bti}\big)^2$
# for the attention weights `alphas (B, T, P)` of a batch of captions of different
# lengths, the boolean mask of real steps `mask (B, T)` (`step_mask`), and $\lambda$ =
# `lam`. It must return a scalar tensor that gradients flow through (training
# back-propagates it) and match `caption_loss`'s term for every $\lambda$, not only 0.
# Which captions of a batch does the regulariser push hardest, the short or the long ones?

# %% nbgrader={"grade": false, "grade_id": "ex1-solution", "locked": false, "schema_version": 3, "solution": true}
def attention_penalty(alphas: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    total = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, P): attention over the real steps
    return lam * ((1 - total) ** 2).sum(dim=1).mean()
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex1-test", "locked": true, "points": 4, "schema_version": 3, "solution": false}
# visible: 5 random batches of lengths 2-8 and lambdas in 0.1-4.1, against caption_loss's regulariser, with gradients
checks.check_attention_penalty(attention_penalty, trials=5)
checks.check_equal(float(attention_penalty(torch.full((1, 2, 4), 0.25), step_mask(torch.tensor([3]), 2),
                                           3.0)), 3.0, "attention_penalty(uniform weights, 2 steps, 4 regions, lam=3)",
                   "each region gets 0.5 over the caption: 4 * (1 - 0.5)^2 = 1, times lam")
### BEGIN HIDDEN TESTS
# hidden: 30 more batches and lambdas; lambda = 0 gives 0
checks.check_attention_penalty(attention_penalty, trials=30, seed=1)
alphas = torch.softmax(torch.randn(2, 5, 7), dim=2)  # (B, T, P)
mask = step_mask(torch.tensor([6, 3]), 5)  # (B, T)
checks.check_equal(float(attention_penalty(alphas, mask, 0.0)), 0.0, "attention_penalty(..., lam=0)")
### END HIDDEN TESTS
checks.passed("Exercise 1")

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 1.** A caption of $C$ real steps spreads a total attention of $C$ over
# the $P$ regions; the penalty is smallest when every region gets about one unit, which
# only a caption of about $P = 49$ steps can do. The short captions are pushed hardest:
# their smallest possible penalty, $P (1 - C/P)^2$ with the attention spread evenly, is
# larger, and so is the gradient $-2(1 - \sum_t \alpha_{bti})$ at every region. The
# regulariser thus makes them spread their little attention thinly rather than stare at
# one region; the mean over the batch weighs every caption equally, whatever its length.
# The usual mistakes: summing over the padded steps (no mask), squaring per step instead
# of after the sum over steps, the sum instead of the mean over the batch, and `.item()`
# (no gradient).

# %% [markdown]
# **Exercise 2 (quick check).** The trainer clips gradients before each optimiser step.
# Write `clip_grad_norm(grads, max_norm)` for a list of gradient tensors: compute the
# norm of all of them together, $\lVert g \rVert = \sqrt{\sum_k \lVert g_k \rVert^2}$,
# and when it exceeds `max_norm` scale *every* tensor by `max_norm / (norm + 1e-6)`;
# return the list of (clipped) tensors and the norm before clipping, as a tensor — what
# `torch.nn.utils.clip_grad_norm_` does in place.

# %% nbgrader={"grade": false, "grade_id": "ex2-solution", "locked": false, "schema_version": 3, "solution": true}
def clip_grad_norm(grads: list[torch.Tensor], max_norm: float):
    ### BEGIN SOLUTION
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).float()
    scale = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * scale for g in grads], norm
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ex2-test", "locked": true, "points": 2, "schema_version": 3, "solution": false}
# visible: one norm over all tensors; 5 random lists against clip_grad_norm_; small gradients untouched
checks.check_clip_grad_norm(clip_grad_norm, trials=5)
### BEGIN HIDDEN TESTS
# hidden: 30 more lists and limits
checks.check_clip_grad_norm(clip_grad_norm, trials=30, seed=1)
### END HIDDEN TESTS
checks.passed("Exercise 2")

# %% [markdown]
# **Exercise 3 (written).** The offline recipe trains with $\lambda$ (`alpha_c`) = 0.
# What happens to the attention maps and the grounding score with $\lambda = 0.02$ (the
# Colab recipe's), or 10? Predict first, then try it: `dataclasses.replace(model_config,
# alpha_c=...)` and a short `ensure_trained` run, and look at the maps of chapter 6.

# %% [markdown] tags=["remove-cell", "instructors-key"]
# **Key, exercise 3.** The regulariser asks every region to receive about one step of
# attention over the caption; with fewer words than regions it cannot, and its minimum is
# attention spread evenly (for a caption of 10 steps over 49 regions, every region at
# $10/49$ of a step). Its pull therefore works against looking at the one object being
# named. Measured from the same seed over eight epochs (`benchmarks/results/`
# `recipe_today__xeon-amx.json` with $\lambda = 0.02$ against
# `recipe_alpha-c-0__xeon-amx.json` with $\lambda = 0$): with 0.02 the validation
# grounding was lower after every epoch, and F1 after the eighth no higher. With $\lambda = 10$ the pull
# dominates the cross-entropy's: the context comes close to the mean region for every
# word, and grounding and captions should get worse still (the expected effect; the book
# does not train that model). On Flickr8k, whose captions describe whole scenes, the
# paper reports that the regulariser helps. A good answer predicts the
# direction, runs both, and compares maps or the grounding score, not only BLEU.

# %% [markdown]
# **Hand in.** The last cell lists the exercises whose test cell ran to its end in this
# session. On Colab, run all cells, then hand in this notebook (*File → Download →
# .ipynb*) or a copy of that list; an instructor's grader also runs hidden tests.

# %%
checks.summary({"Exercise 1": 4, "Exercise 2": 2})
