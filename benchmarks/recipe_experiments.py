"""Experiment: which offline recipe learns fastest per second of a 2-core CPU.

Each variant is `recipe("shapes")` with a few settings changed (`VARIANTS`), trained by
`caption_lib.train.train` on the shapes data set of the workspace (`ensure_shapes()`),
from the same seed, one epoch per call (`resume=True` continues exactly, so the curve is
that of one uninterrupted run). After every epoch the model is evaluated on the whole
validation split by greedy decoding (`caption_lib.evaluate.evaluate`): semantic F1,
attention grounding (mass and arg-max) and BLEU-4. The curve goes to
`benchmarks/results/recipe_<name>.json`, rewritten after every epoch:

    {"variant", "settings": {"model": ..., "train": ...}, "cache": {stage, seconds},
     "epochs": [{"epoch", "val_semantic_f1", "val_grounding_mass", "val_grounding_argmax",
                 "val_bleu4", "train_seconds", "seconds", ...}], "machine": ...}

`seconds` per epoch are the trainer's own (training + BatchNorm re-estimation + its
validation); the extra evaluation is not counted. Times are of the machine that ran it:
on a shared machine they are contended, so `cpu_seconds` (the process's CPU time for the
epoch, all threads, loading the checkpoint included) is recorded as well: with
`--threads 1` it is close to what the epoch takes alone on one core. `--step-ratio`
measures the training step of the variants side by side in one process (interleaved),
wall and CPU time, ratios that stay meaningful on a shared machine.

    python benchmarks/recipe_experiments.py layer4.1 layer4.2 [--epochs 10] [--threads 2]
    python benchmarks/recipe_experiments.py today --epochs 9 --extend   # continue a curve
    python benchmarks/recipe_experiments.py today --epochs 14 --tag xeon-amx   # another machine
    python benchmarks/recipe_experiments.py --step-ratio today layer4.1 layer4.2
    python benchmarks/recipe_experiments.py decoder-on-today --epochs 6   # after `make runs`
    python benchmarks/recipe_experiments.py mix-on-today --epochs 6 --tag epyc   # its scene mix
    python benchmarks/recipe_experiments.py --list
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import caption_lib.model  # the experiments replace some of their names in this process
import caption_lib.train
from caption_lib.data import load_dataset, split_records
from caption_lib.decoder import DecoderWithAttention
from caption_lib.encoder import EncoderCNN
from caption_lib.evaluate import evaluate
from caption_lib.features import cached_features, calibrate_frozen
from caption_lib.metrics import grounding_report
from caption_lib.model import Captioner, build_encoder
from caption_lib.runtime import workspace_dir
from caption_lib.shapes import ensure_shapes
from caption_lib.train import recipe, run_dir_for, same_features_runs, train
from caption_lib.vocab import Vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gemm import cpu  # benchmarks/ is a folder of scripts, not a package

RESULTS = Path(__file__).resolve().parent / "results"
# what variants replace in this process (`run_variant`); `main` puts them back after each
# variant, so that variants trained by one call do not inherit each other's changes
REPLACED = ((caption_lib.model, "EncoderCNN"), (caption_lib.train, "_scheduler"),
            (caption_lib.train, "_epoch_batches"), (caption_lib.train, "_optimizer"),
            (caption_lib.train, "calibrate_frozen"), (caption_lib.train.CachedSplit, "batch"),
            (caption_lib.train, "train_one_epoch"),
            (DecoderWithAttention, "__init__"))

# name -> (CaptionerConfig changes, TrainConfig changes) relative to recipe("shapes")
VARIANTS: dict[str, tuple[dict, dict]] = {
    # the recipe as it is now; curves measured before a recipe change record the settings
    # they ran with (the shapes recipe's alpha_c went from 0.02 to 0 after "alpha-c-0",
    # so "today" curves written before that ran with 0.02; the results page says so)
    "today": ({}, {}),
    "layer4.1": ({"fine_tune": "layer4.1"}, {}),
    "layer4.2": ({"fine_tune": "layer4.2"}, {}),
    "layer4.2-lr2x": ({"fine_tune": "layer4.2"}, {"lr": 8e-4, "encoder_lr": 4e-4}),
    "layer4.1-lr2x": ({"fine_tune": "layer4.1"}, {"lr": 8e-4, "encoder_lr": 4e-4}),
    "layer4.2-caps2": ({"fine_tune": "layer4.2"}, {"captions_per_image": 2}),
    "layer4.1-caps2": ({"fine_tune": "layer4.1"}, {"captions_per_image": 2}),
    "caps2": ({}, {"captions_per_image": 2}),
    "caps-all": ({}, {"captions_per_image": 0}),  # every reference in every epoch
    # the fine-tuned stage trains for the first N epochs, the decoder alone after them
    "enc3": ({}, {"encoder_epochs": 3}),
    "enc4": ({}, {"encoder_epochs": 4}),
    "enc5": ({}, {"encoder_epochs": 5}),
    "enc8": ({}, {"encoder_epochs": 8}),  # today's 8 epochs, then the decoder alone
    "enc4-caps-all": ({}, {"encoder_epochs": 4, "captions_per_image": 0}),
    "encoder-lr3x": ({}, {"encoder_lr": 6e-4}),  # the decoder's rate stays 4e-4
    "encoder-lr5x": ({}, {"encoder_lr": 1e-3}),
    "cosine": ({}, {"schedule": "cosine"}),  # over the --epochs of the run (`cosine_over`)
    "cosine-lr2x": ({}, {"schedule": "cosine", "lr": 8e-4, "encoder_lr": 4e-4}),
    "curriculum2": ({}, {}),  # epochs 1-2 on single-object scenes (CURRICULUM)
    "curriculum3": ({}, {}),
    # the fine-tuned stage's residual blocks start as the identity (last BatchNorm scale 0)
    "zero-res": ({}, {}),
    "zero-res-lr2x": ({}, {"lr": 8e-4, "encoder_lr": 4e-4}),
    "layer4.1-bn": ({"fine_tune": "layer4.1"}, {}),
    "layer4.2-bn": ({"fine_tune": "layer4.2"}, {}),
    "layer4.1-uncalibrated": ({"fine_tune": "layer4.1"}, {}),
    "layer4.2-uncalibrated": ({"fine_tune": "layer4.2"}, {}),
    # the doubly stochastic regulariser (lambda = alpha_c) off: its minimum, with fewer
    # words than regions, is attention spread evenly, which works against grounding
    "alpha-c-0": ({"alpha_c": 0.0}, {}),
    "alpha-c-0.005": ({"alpha_c": 0.005}, {}),  # a quarter of the recipe's 0.02
    "dropout-0": ({"dropout": 0.0}, {}),  # no dropout on h_t before the output layer
    "decoder-lr2x": ({}, {"lr": 8e-4}),  # the fine-tuned stage's rate stays 2e-4
    "aux-regions": ({}, {}),  # + the per-region object loss (AUX_REGIONS)
    "aux-regions-0.3": ({}, {}),
    # the paper's deep output layer (Eq. 7), measured on the recipe with one output layer;
    # the recipe has it since (`CaptionerConfig.deep_output`); "single-output" goes back
    "deep-output": ({"deep_output": True}, {}),
    "single-output": ({"deep_output": False}, {}),
    "deep-output-aux": ({"deep_output": True}, {}),  # + the per-region object loss
    "ema": ({}, {}),  # today's run, also evaluated with averaged weights (EMA)
    "ema-short": ({}, {}),  # the same with shorter averages
    # the recipe has averaged weights since (TrainConfig.ema_decay); "no-ema" goes back
    "no-ema": ({}, {"ema_decay": 0.0}),
    # twice the steps per epoch at the same cost per image; also averaged with 0.995, the
    # recipe's horizon in images (200 steps of 16 = 100 of 32)
    "batch-16": ({}, {"batch_size": 16}),
    # one more trained block before layer4, at the 14x14 resolution where the objects are
    # still several regions apart: the frozen part ends after layer3[4] (its cache, the
    # same shape as layer3's, is made once from the images)
    "layer3.5": ({"fine_tune": "layer3.5"}, {}),
    # today's recipe from another training seed (decoder init, data order, dropout; the
    # random encoder, init_seed, and so the feature cache stay): the spread between seeds
    "seed-1": ({}, {"seed": 1}),
    "seed-2": ({}, {"seed": 2}),
    "mix-by-objects": ({}, {}),  # epochs drawn by object count (MIX)
    "first-ref": ({}, {"references": "first"}),  # each image's first reference only
    # the same, fine-tuning less of layer4 (its cache after layer4[0] or layer4[1]): the
    # step's cost falls with the blocks trained (--step-ratio); does learning per epoch hold
    # now that the captions are one form?
    "first-ref-layer4.1": ({"fine_tune": "layer4.1"}, {"references": "first"}),
    "first-ref-layer4.2": ({"fine_tune": "layer4.2"}, {"references": "first"}),
    # twice both learning rates, with one form of caption (decoder-lr2x, with the random
    # draw, learned far slower)
    "first-ref-lr2x": ({}, {"references": "first", "lr": 8e-4, "encoder_lr": 4e-4}),
    # the decoder's training steps in bf16 too (TrainConfig.precision); the recipe has it
    # since, so this is today's recipe, and the fp32 curves above (seed-1, seed-2 and
    # first-ref, __epyc) are the control. The curve was recorded by replacing the
    # trainer's autocast in this process, before the library had the option (its note).
    "decoder-bf16": ({}, {"precision": "bf16", "encoder_epochs": 0}),
    # the recipe with bf16 decoder steps and the fine-tuned stage frozen after epoch 5 or
    # 6 (`encoder_epochs`): its output is cached once and the later epochs train the
    # decoder alone, at about a quarter of a fine-tuning epoch's seconds. "enc4" and "enc8"
    # measured this on the recipe with a random reference per image. The recipe took
    # encoder_epochs 7 (bf16-enc7, below) after all of these: a variant that does not name
    # encoder_epochs has run with 7 since, and ran with 0 before.
    "bf16-enc5": ({}, {"encoder_epochs": 5}),
    "bf16-enc6": ({}, {"encoder_epochs": 6}),
    # decoder-bf16 from another training seed (layer4 in all eight epochs): with it, the
    # bf16 steps' seed spread beside the fp32 seeds' (seed-1, seed-2 __epyc), and the
    # control of bf16-enc6-seed-1
    "bf16-seed-1": ({}, {"precision": "bf16", "seed": 1, "encoder_epochs": 0}),
    # the recipe before encoder_epochs 7, from seed 0, by the library's own bf16 path: the
    # book's default run then, scored after every epoch (decoder-bf16 was recorded by a
    # replaced autocast)
    "bf16-seed-0": ({}, {"precision": "bf16", "seed": 0, "encoder_epochs": 0}),
    "bf16-enc6-seed-1": ({}, {"encoder_epochs": 6, "seed": 1}),  # bf16-enc6 from seed 1
    # frozen after epoch 7: only the eighth epoch trains the decoder alone; the recipe
    # since, so bf16-enc7 is the book's default run scored after every epoch
    "bf16-enc7": ({}, {"encoder_epochs": 7}),
    "bf16-enc7-seed-1": ({}, {"encoder_epochs": 7, "seed": 1}),
    # the bf16 recipe fine-tuning layer4's last two blocks only (on the cache after
    # layer4[0]), frozen after epoch 9 of 10: first-ref-layer4.1 (fp32 decoder steps,
    # stage in all epochs) took about 44 s an epoch against 58-63 for the whole stage and
    # trailed it by about an epoch; does a longer run of the cheaper step fit in the time?
    "bf16-layer4.1-enc9": ({"fine_tune": "layer4.1"}, {"encoder_epochs": 9}),  # --epochs 10
    # the recipe with layer4's first blocks frozen part-way (PROGRESSIVE)
    "bf16-blocks2-after4": ({}, {}),
    "bf16-blocks2-after5": ({}, {}),
}
# name -> a decoder trained alone on the frozen encoder of the book's default run (today's
# recipe, finished by `make runs`; `train.same_features_runs`): how far that run's
# features take a fresh decoder, i.e. whether the features or the decoder limit the run
# (its attention, changes to its CaptionerConfig)
ON_DEFAULT_RUN = {"decoder-on-today": ("soft", {}),
                  # twice the recipe's decoder sizes: does the decoder's capacity limit F1?
                  "decoder512-on-today": ("soft", {"embed_dim": 512, "decoder_dim": 512,
                                                   "attention_dim": 512}),
                  # the same fresh decoder, its epochs drawn by object count (MIX)
                  "mix-on-today": ("soft", {}),
                  # the same fresh decoder, trained on each image's first reference only
                  "first-ref-on-today": ("soft", {})}
# Progressive freezing, not in the library: after epoch PROGRESSIVE[name][0], the first
# PROGRESSIVE[name][1] blocks of the fine-tuned stage (layer4) stop training (their
# parameters stop requiring gradients, so autograd runs no backward through them; they
# still run forward from the layer3 cache, BatchNorm in train mode as before), and only
# its later blocks and the decoder train until the recipe freezes the whole stage
# (encoder_epochs). The question: do the late epochs need the early blocks to move, or
# can they run at about half a fine-tuning step's cost (the last block alone measured 4.6x
# the whole stage's images/s in isolation, issue 19)? `progressive_freeze` installs it.
PROGRESSIVE = {"bf16-blocks2-after4": (4, 2), "bf16-blocks2-after5": (5, 2)}
# Training from a block ("layer4.1") calibrates the BatchNorm statistics of the stage's
# frozen blocks on `bn_images` training images (`features.calibrate_frozen`, run by the
# trainer). "-uncalibrated" switches that off (the frozen blocks keep their untrained
# statistics, mean 0 and variance 1: their output, mean ~8 and std ~12 here, passes
# unnormalised through the identity paths of the trained blocks into the decoder).
# "-bn" calibrates instead on BN_IMAGES training images from the layer3 cache and derives
# its cache from the layer3 cache (`frozen_bn_encoder`, `derive_cache`): the first
# experiment that tried the idea, cheaper to run on a shared machine.
UNCALIBRATED = {"layer4.1-uncalibrated", "layer4.2-uncalibrated"}
FROZEN_BN = {"layer4.1-bn", "layer4.2-bn"}
# The trainable bottleneck blocks of a random encoder get the scale of their last
# BatchNorm (bn3.weight) set to zero before training, so that each block starts as its
# shortcut alone (Goyal et al. 2017, "zero-gamma"; torchvision's zero_init_residual, here
# for the trained stage only: the frozen stages, hence the layer3 cache, stay as they are)
ZERO_RESIDUAL = {"zero-res", "zero-res-lr2x"}
# The cosine schedule decays over the run's `epochs` steps; the experiment trains one epoch
# per call, so its horizon is fixed at the --epochs asked for (`cosine_over`), as in one
# uninterrupted run of that many epochs.
# A curriculum: the first CURRICULUM[name] epochs train on the single-object scenes of the
# training split only (about a third of its images, so those epochs take about a third of
# the time); the vocabulary, the caches and validation are the whole data set's as usual
CURRICULUM = {"curriculum2": 2, "curriculum3": 3}
BN_IMAGES = 1024
# Not in the paper: offline there is no ImageNet pre-training, so the fine-tuned stage
# learns what a region holds only through attention and the LSTM. "aux-regions" gives it
# a direct signal from the scene's own labels: a linear layer of the decoder reads each of
# the 49 region vectors and predicts the object whose box overlaps that cell (colour x
# shape x size, 24 classes, or background), cross-entropy averaged over the regions, added
# to the caption loss with weight AUX_REGIONS[name]; training only (the validation loss
# and decoding do not use it). `aux_region_loss` installs it in this process.
AUX_REGIONS = {"aux-regions": 1.0, "aux-regions-0.3": 0.3, "deep-output-aux": 1.0}
# Polyak averaging, not in the paper: validation F1 swings from epoch to epoch while the
# loss falls (recipe_today__xeon-amx-deep-output.json), the mark of weights that move
# between nearby minima. "ema" trains exactly today's run (its own curve is that run's) and
# keeps, beside it, exponential moving averages of the trainable weights with each decay
# per optimiser step (about 94 steps an epoch); after every epoch each average is copied
# into the model, the fine-tuned stage's BatchNorm statistics are re-estimated for it on
# `bn_images` training images (as the trainer does for its own weights), and it is
# evaluated like the run. The averages live in this process (`ema_weights`): the curve must
# be trained in one call (no --extend). The library has the option since
# (`TrainConfig.ema_decay`, `caption_lib.averaging`); the two curves were written before
# it, with averages that started from the initial weights (w_avg <- d w_avg + (1 - d) w,
# by `lerp_`); the library's are bias-corrected (`caption_lib.averaging`): the initial
# weights keep no share. Their share had fallen to 0.99^470 < 1 % by epoch 5 (94 steps an
# epoch), so the two agree from there on; early epochs of an "ema" curve run today are
# higher than these.
EMA = {"ema": (0.99, 0.995, 0.998), "ema-short": (0.97, 0.98), "batch-16": (0.995,)}
# The mix of scene sizes: every split holds about a third each of one-, two- and
# three-object scenes, and chapter 6's failures gather in the three-object ones (the
# right attributes bound to the wrong object). A MIX variant draws each epoch's images
# with replacement, with probability proportional to MIX[name][n - 1] for a scene of n
# objects (1 : 2 : 3 gives, in expectation, a sixth single objects, a third pairs and half
# triples), as many draws as the split has images, one caption each as the recipe does:
# an epoch costs what the recipe's costs. Validation and test keep their own mix.
MIX = {"mix-by-objects": (1, 2, 3), "mix-on-today": (1, 2, 3)}
# One form of caption: a shapes image's five references say the same scene in different
# forms (the first, the canonical chain, names every object's size, colour and shape and
# where it is relative to the next), and greedy decoding must pick one form at the first
# word. A FIRST_REFERENCE variant trains on each image's first reference only, in the
# trainer's own order of images (validation still scores against every reference): the
# library's `TrainConfig.references="first"`, which the two curves were recorded with
# (by an epoch-batch replacement in this script, before the library had the option). The
# shapes recipe trains on the first reference since: "decoder-on-today" and today's
# variants do too now, and the curves recorded before the change are the random draw's.
FIRST_REFERENCE = {"first-ref-on-today"}  # "first-ref" sets it in VARIANTS


def configs(name: str, epochs: int, data: Path | None = None):
    """recipe("shapes") with the variant's changes and `epochs` epochs (`ON_DEFAULT_RUN`:
    the same-features decoder on the default run of the shapes data set in `data`)."""
    model_config, config = recipe("shapes")
    if name in ON_DEFAULT_RUN:
        default = run_dir_for(data, model_config, config)
        if not (default / "best.pt").is_file():
            raise SystemExit(f"{name}: no default run in {default} (run `make runs` first)")
        decoder, changes = ON_DEFAULT_RUN[name]
        model_config, config = same_features_runs(default, model_config, config, epochs,
                                                  decoders=(decoder,))[decoder]
        if name in FIRST_REFERENCE:  # the library's option (the curves predate it)
            config = dataclasses.replace(config, references="first")
        return dataclasses.replace(model_config, **changes), config
    model_changes, train_changes = VARIANTS[name]
    model_config = dataclasses.replace(model_config, **model_changes)
    config = dataclasses.replace(config, **{"epochs": epochs, **train_changes})
    return model_config, config


def _changes(name: str) -> tuple[dict, dict]:
    """What the variant changes, as the results page shows it (no machine's paths)."""
    if name in ON_DEFAULT_RUN:
        decoder, changes = ON_DEFAULT_RUN[name]
        model, train = {"encoder": "the default run's best.pt, frozen", "decoder": "a fresh "
                        f"{decoder}-attention decoder", **changes}, {}
    else:
        model, train = VARIANTS[name]
    if name in CURRICULUM:
        train = {**train, "curriculum": f"epochs 1-{CURRICULUM[name]} on single-object scenes"}
    if name in ZERO_RESIDUAL:
        model = {**model, "layer4 bottlenecks' last BatchNorm scale (bn3.weight)": "0 at the start"}
    if name in PROGRESSIVE:
        after, blocks = PROGRESSIVE[name]
        train = {**train, "progressive freezing (not in the library)":
                 f"layer4[:{blocks}] stop training after epoch {after}"}
    if name in AUX_REGIONS:
        train = {**train, "per-region object loss (not in the paper)": AUX_REGIONS[name]}
    if name in FIRST_REFERENCE:
        train = {**train, "references trained on": "the first (canonical) one only"}
    if name in MIX:
        train = {**train, "epoch images drawn by object count (weights of 1, 2, 3 objects)":
                 list(MIX[name])}
    if name in EMA:
        train = {**train, "weight averages (EMA, not in the paper), decays": list(EMA[name])}
    return model, train


def _machine() -> dict:
    """Threads, CPUs, torch, the CPU's model name and its bf16 matrix units (curves are
    compared at equal CPU time only between runs on the same model)."""
    info = cpu()  # the benchmarks' own reading of /proc/cpuinfo
    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "processor": platform.processor() or platform.machine(),
            "cpu_model": info["model"],
            "cpu_flags": sorted(set(info["flags"]) & {"avx512_bf16", "amx_bf16"}),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _cache(cls: type[EncoderCNN], model_config, config, records: list,
           calibrate: bool = True) -> dict:
    """Make (or find) the feature caches the trainer will use; their extraction seconds
    (calibration of the frozen BatchNorm statistics, if any, not included)."""
    encoder = _encoder(cls, model_config)
    if calibrate:  # as the trainer does before it caches
        calibrate_frozen(encoder, [r.image for r in split_records(records, "train")],
                         images=config.bn_images, seed=config.seed)
    seconds, shapes = 0.0, {}
    for split in ("train", "val"):
        store = cached_features(encoder, [r.image for r in split_records(records, split)],
                                cache_root=workspace_dir() / "features", progress=False)
        seconds += float(store.meta.get("seconds", 0.0))
        shapes[split] = list(store.shape)
    return {"stage": encoder.cached_stage, "extraction_seconds": round(seconds, 1),
            "shapes": shapes}


def _encoder(cls, model_config, fine_tune=None) -> EncoderCNN:
    if model_config.encoder_weights.endswith(".pt"):  # a finished run's encoder, frozen
        return build_encoder(model_config)
    return cls(weights=model_config.encoder_weights, init_seed=model_config.init_seed,
               fine_tune=fine_tune or model_config.fine_tune)


def frozen_bn_encoder(model_config, records: list) -> type[EncoderCNN]:
    """An `EncoderCNN` class whose frozen blocks of the split stage (`frozen[-1]`, e.g.
    layer4[:1] for "layer4.1") carry BatchNorm statistics of BN_IMAGES training images.

    The statistics are estimated on the stage's cached input (the layer3 cache of the
    stage-level recipe) with cumulative averages, then frozen; the cache key sees them
    through `frozen_fingerprint`. An experiment only: checkpoints do not store them.
    """
    stage = model_config.fine_tune.partition(".")[0]
    source = cached_features(_encoder(EncoderCNN, model_config, stage),
                             [r.image for r in split_records(records, "train")],
                             cache_root=workspace_dir() / "features", progress=False)
    block = _encoder(EncoderCNN, model_config).frozen[-1]  # layer4[:k]
    norms = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    idx = torch.randperm(len(source), generator=torch.Generator().manual_seed(0))[:BN_IMAGES]
    block.train()
    with torch.no_grad():
        for k in range(0, len(idx), 64):
            block(source[idx[k:k + 64]].float())  # (b, 2048, 7, 7), updates statistics
    for m in norms:
        m.momentum = 0.1
    stats = {k: v.clone() for k, v in block.state_dict().items()
             if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}

    class FrozenBN(EncoderCNN):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.load_frozen_batchnorm_state(stats)  # the trainer does not calibrate again

    return FrozenBN


class ZeroResidualEncoder(EncoderCNN):
    """`EncoderCNN` whose trainable bottlenecks start with bn3.weight = 0 (random init only;
    a checkpoint's weights replace them when a run resumes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.pretrained:
            from torchvision.models.resnet import Bottleneck

            for block in self.trainable.modules():
                if isinstance(block, Bottleneck):
                    torch.nn.init.zeros_(block.bn3.weight)


def cosine_over(epochs: int):
    """The trainer's `_scheduler` with a cosine horizon of `epochs` epochs, whatever the
    epochs of the call (the experiment raises them by one per call)."""
    original = caption_lib.train._scheduler

    def scheduler(optimizer, config, steps_per_epoch):
        return original(optimizer, dataclasses.replace(config, epochs=epochs), steps_per_epoch)

    return scheduler


def curriculum_batches(epochs: int):
    """The trainer's `_epoch_batches`, except that epochs 1..`epochs` keep only the
    single-object scenes: the epoch's shuffled (image, caption) pairs filtered, in the same
    order, and regrouped into batches of `batch_size` images."""
    original = caption_lib.train._epoch_batches

    def batches(split, config, epoch):
        full = original(split, config, epoch)
        if epoch > epochs:
            return full
        kept, images = [[]], 0
        for i, j in (pair for pairs in full.pairs for pair in pairs):
            if len(split.records[i].objects) != 1:
                continue
            if not kept[-1] or kept[-1][-1][0] != i:  # a new image of this batch
                if images == config.batch_size:
                    kept.append([])
                    images = 0
                images += 1
            kept[-1].append((i, j))
        return caption_lib.train._EpochBatches(split, [b for b in kept if b])

    return batches


def mixed_batches(weights: tuple[float, ...]):
    """The trainer's `_epoch_batches` replaced: the epoch's images drawn with replacement,
    an image of n objects with weight `weights[n - 1]`, as many as the split has, each
    with one of its captions at random, in batches of `batch_size` draws (an image drawn
    twice into one batch is one image with two captions there). Seeded by (seed, epoch)
    as the trainer's order is."""
    def batches(split, config, epoch):
        g = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        w = torch.tensor([float(weights[len(r.objects) - 1]) for r in split.records])  # (N,)
        drawn = torch.multinomial(w, len(w), replacement=True, generator=g).tolist()
        pairs = [(i, int(torch.randint(len(split.encoded[i]), (1,), generator=g)))
                 for i in drawn]
        size = config.batch_size
        return caption_lib.train._EpochBatches(
            split, [pairs[k:k + size] for k in range(0, len(pairs), size)])

    return batches


def region_targets(objects: list[dict], grid: int = 7) -> torch.Tensor:
    """(grid * grid,) int64: per region, 1 + the class of the object whose box overlaps the
    cell (colour x shape x size; a later object wins a shared cell), 0 for background."""
    from caption_lib.shapes import COLOURS, SHAPES, SIZES, object_cell_mask

    target = torch.zeros(grid * grid, dtype=torch.long)  # (P,)
    for o in objects:
        label = 1 + (COLOURS.index(o["colour"]) * len(SHAPES) + SHAPES.index(o["shape"])) \
            * len(SIZES) + SIZES.index(o["size"])
        target[object_cell_mask(o, grid).flatten()] = label
    return target


def aux_region_loss(weight: float) -> None:
    """Install the per-region object loss (`AUX_REGIONS`) in this process: every decoder
    gets a `region_head` (saved with it, so resuming continues it), every training batch
    remembers its images' region targets, and `Captioner.cached_loss` adds the weighted
    loss while the model trains."""
    import torch.nn.functional as F

    from caption_lib.shapes import COLOURS, SHAPES, SIZES

    classes = 1 + len(COLOURS) * len(SHAPES) * len(SIZES)
    init, batch = DecoderWithAttention.__init__, caption_lib.train.CachedSplit.batch
    current: dict = {}

    def decoder_init(self, vocab_size, encoder_dim=2048, *args, **kwargs):
        init(self, vocab_size, encoder_dim, *args, **kwargs)
        self.region_head = torch.nn.Linear(encoder_dim, classes)

    def split_batch(self, pairs, weights=None):
        if not hasattr(self, "region_targets"):
            self.region_targets = torch.stack([region_targets(r.objects) for r in self.records])
        current["targets"] = self.region_targets[torch.tensor(sorted({i for i, _ in pairs}))]
        return batch(self, pairs, weights)

    def cached_loss(self, cached, captions, lengths, owner=None, weights=None,
                    precision="auto", encoder=None):
        features = self.encode_cached(cached, precision, encoder)  # (B, P, E)
        extra = 0.0
        if self.training and "targets" in current:
            logits = self.decoder.region_head(features)  # (B, P, classes)
            extra = weight * F.cross_entropy(logits.flatten(0, 1), current["targets"].flatten())
        if owner is not None:
            features = features.index_select(0, owner)  # (N, P, E)
        loss, parts = self.loss(features, captions, lengths, weights=weights)
        return loss + extra, parts

    DecoderWithAttention.__init__ = decoder_init
    caption_lib.train.CachedSplit.batch = split_batch
    Captioner.cached_loss = cached_loss


def ema_weights(decays: tuple[float, ...]) -> dict:
    """Install the averages (`EMA`) in this process: the trainer's optimiser gets a step
    hook that updates one `caption_lib.averaging.WeightAverage` per decay. The experiment
    trains one epoch per `train` call, each with a model loaded from `last.pt`: the
    averages carry over from call to call here. Returns {decay: WeightAverage}."""
    from caption_lib.averaging import WeightAverage

    averages: dict[float, WeightAverage] = {}
    make = caption_lib.train._optimizer

    def optimizer(model, config):
        opt = make(model, config)
        for d in decays:
            fresh = WeightAverage(model, d)  # this call's model; the averages so far
            if d in averages:
                fresh.averages, fresh.steps = averages[d].averages, averages[d].steps
            averages[d] = fresh
        opt.register_step_post_hook(lambda *_: [a.update() for a in averages.values()])
        return opt

    caption_lib.train._optimizer = optimizer
    return averages


def evaluate_average(model, average, data: Path, records: list, config) -> dict:
    """Validation scores of `model` with the `average` weights, BatchNorm re-estimated."""
    from caption_lib.encoder import recalibrate_batchnorm
    from caption_lib.features import workspace_features

    train_records = split_records(records, "train")
    store = workspace_features(model.encoder, train_records, progress=False)
    g = torch.Generator().manual_seed(config.seed)
    idx = torch.randperm(len(train_records), generator=g)[:config.bn_images]
    with average.applied():
        recalibrate_batchnorm(model.encoder, (store[idx[k:k + 64]] for k in range(0, len(idx), 64)))
        val = evaluate(model, data, split="val", meteor=False, progress=False)
    report = grounding_report([c["caption"].split() for c in val.captions], val.alphas,
                              [r.objects for r in split_records(records, "val")])
    return {"val_semantic_f1_all": round(val.scores["semantic_f1"], 4),
            "val_grounding_mass": round(report["mass"], 4),
            "val_grounding_argmax": round(report["argmax"], 4),
            "val_bleu4_all": round(val.scores["bleu4"], 2)}


def derive_cache(cls: type[EncoderCNN], model_config, records: list) -> None:
    """Fill the cache of `cls`'s encoder from the stage's input cache (layer3) by running
    only the frozen blocks of the split stage: the same values up to bf16/fp16 rounding,
    for a fraction of the cost of extracting from the images again."""
    import hashlib

    import numpy as np

    from caption_lib.features import cache_key

    stage = model_config.fine_tune.partition(".")[0]
    encoder = _encoder(cls, model_config).eval()
    for split in ("train", "val"):
        paths = [r.image for r in split_records(records, split)]
        key = cache_key(encoder, paths, 224)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        folder = workspace_dir() / "features" / f"{key['backbone']}-{key['stage']}-{digest}"
        if (folder / "meta.json").is_file():
            continue
        source = cached_features(_encoder(EncoderCNN, model_config, stage), paths,
                                 cache_root=workspace_dir() / "features", progress=False)
        tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        start, out = time.perf_counter(), None
        for k in range(0, len(paths), 64):
            x = source[torch.arange(k, min(k + 64, len(paths)))].float()  # (b, 1024, 14, 14)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                y = encoder.frozen[-1](x).float()  # (b, 2048, 7, 7)
            if out is None:
                out = np.lib.format.open_memmap(tmp / "features.npy", mode="w+",
                                                dtype=np.float16, shape=(len(paths), *y.shape[1:]))
            out[k:k + len(y)] = y.numpy().astype(np.float16)
        out.flush()
        del out
        meta = {"key": key, "shape": [len(paths), *y.shape[1:]], "dtype": "float16",
                "seconds": round(time.perf_counter() - start, 1), "device": "cpu",
                "fast": True, "derived_from": str(source.path)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, folder)


def run_variant(name: str, epochs: int, data: Path, extend: bool = False, tag: str = "") -> dict:
    """Train `name` for `epochs`, evaluating after each; returns (and writes) its curve.
    `extend`: continue the curve already written, from its run folder, up to `epochs`.
    `tag`: written to `recipe_<name>__<tag>.json` instead (e.g. a second machine's curve)."""
    model_config, config = configs(name, epochs, data)
    label = f"{name}__{tag}" if tag else name
    out = workspace_dir() / "runs" / f"recipe-exp-{label}"
    path = RESULTS / f"recipe_{label}.json"
    if extend and not ((out / "last.pt").is_file() and path.is_file()):
        raise SystemExit(f"--extend {name}: no curve to continue ({path} and {out / 'last.pt'})")
    if not extend:
        shutil.rmtree(out, ignore_errors=True)
    records = load_dataset(data)
    encoder_cls = EncoderCNN
    if name in FROZEN_BN:  # the experiment's encoder replaces the library's in this process
        encoder_cls = frozen_bn_encoder(model_config, records)
        derive_cache(encoder_cls, model_config, records)
        caption_lib.model.EncoderCNN = encoder_cls
    if name in ZERO_RESIDUAL:  # the experiment's encoder replaces the library's
        encoder_cls = caption_lib.model.EncoderCNN = ZeroResidualEncoder
    if config.schedule == "cosine":  # one horizon for the whole curve
        if extend:
            raise SystemExit(f"--extend {name}: a cosine curve's horizon is its --epochs; "
                             "train it again with the epochs wanted")
        caption_lib.train._scheduler = cosine_over(epochs)
    if name in CURRICULUM:  # the experiment's epoch batches replace the trainer's
        caption_lib.train._epoch_batches = curriculum_batches(CURRICULUM[name])
    if name in MIX:  # the experiment's epoch batches replace the trainer's
        caption_lib.train._epoch_batches = mixed_batches(MIX[name])
    if name in AUX_REGIONS:  # the experiment's loss replaces the trainer's in this process
        aux_region_loss(AUX_REGIONS[name])
    averages = None
    if name in EMA:  # the averages follow the trainer's steps in this process
        if extend:
            raise SystemExit(f"--extend {name}: the averages live in one process; train "
                             "it again with the epochs wanted")
        averages = ema_weights(EMA[name])
    if name in PROGRESSIVE:  # the experiment's epoch replaces the trainer's in this process
        progressive_freeze(*PROGRESSIVE[name])
    if name in UNCALIBRATED:  # the trainer's calibration switched off in this process
        caption_lib.train.calibrate_frozen = lambda *args, **kwargs: 0
    result = {"variant": name, "data": str(data),
              "command": "python benchmarks/recipe_experiments.py " + " ".join(sys.argv[1:]),
              "settings": {"model": dataclasses.asdict(model_config),
                           "train": dataclasses.asdict(config),
                           "changes": dict(zip(("model", "train"), _changes(name)))},
              "cache": _cache(encoder_cls, model_config, config, records,
                              calibrate=name not in UNCALIBRATED),
              "machine": _machine(),
              "frozen_bn": (f"calibrated on {BN_IMAGES} training images (layer3 cache)"
                            if name in FROZEN_BN else "untrained (mean 0, variance 1)"
                            if name in UNCALIBRATED else
                            f"calibrated on bn_images={config.bn_images} training images"),
              "epochs": []}
    if config.schedule == "cosine":
        result["note"] = f"The learning rate follows one cosine over all {epochs} epochs."
    if name in ON_DEFAULT_RUN:  # the results page leaves it out of the equal-CPU table
        result["starts_from"] = ("the default run's finished encoder: its own training time "
                                 "is not in these seconds, so this curve is left out of the "
                                 "equal-CPU comparison")
    if extend:  # the same run, trained on by the trainer's exact resume
        previous = json.loads(path.read_text())
        result["epochs"], result["cache"] = previous["epochs"], previous["cache"]
        result["command"] = previous["command"] + " ; " + result["command"]
    for epoch in range(len(result["epochs"]) + 1, epochs + 1):
        config.epochs = epoch
        cpu = time.process_time()
        run = train(data, out, model_config, config, device="cpu", resume=True, progress=False,
                    log=lambda *_: None)
        if len(run.history) < epoch:  # the trainer stopped early (`TrainConfig.early_stop`)
            result["note"] = (f"The trainer stopped early after epoch {len(run.history)}: "
                              f"{config.early_stop} epochs without a better validation BLEU-4 "
                              "or loss.")
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{name}: {result['note']}", flush=True)
            break
        entry = dict(run.history[-1])
        entry["cpu_seconds"] = round(time.process_time() - cpu, 1)  # all threads, with loading
        start = time.perf_counter()
        val = evaluate(run.model, data, split="val", meteor=False, progress=False)
        report = grounding_report([c["caption"].split() for c in val.captions], val.alphas,
                                  [r.objects for r in split_records(records, "val")])
        entry.update({"val_semantic_f1_all": round(val.scores["semantic_f1"], 4),
                      "val_grounding_mass": round(report["mass"], 4),
                      "val_grounding_argmax": round(report["argmax"], 4),
                      "val_bleu4_all": round(val.scores["bleu4"], 2),
                      "eval_seconds": round(time.perf_counter() - start, 1),
                      "load_average": round(os.getloadavg()[0], 2)})
        if averages is not None:
            entry["ema"] = {str(d): evaluate_average(run.model, a, data, records, config)
                            for d, a in averages.items()}
            print(name, epoch, {d: e["val_semantic_f1_all"] for d, e in entry["ema"].items()})
        result["epochs"].append(entry)
        print(f"{name} epoch {epoch}: val F1 {entry['val_semantic_f1_all']:.3f} "
              f"(trainer's {entry.get('val_semantic_f1', float('nan')):.3f}), grounding "
              f"{entry['val_grounding_mass']:.3f}/{entry['val_grounding_argmax']:.3f}, "
              f"{entry['seconds']:.0f} s (load {entry['load_average']})", flush=True)
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def progressive_freeze(after: int, blocks: int) -> None:
    """From epoch `after` + 1 on, `train_one_epoch` first stops the gradients of the first
    `blocks` blocks of the fine-tuned stage (`PROGRESSIVE`). `run_variant` trains epoch
    `config.epochs` in each call (and a resumed model requires all gradients again)."""
    original = caption_lib.train.train_one_epoch

    def epoch(model, batches, optimizer, config, *args, **kwargs):
        if config.epochs > after and model.encoder.trained_stages:
            stage = model.encoder.trainable[0]  # layer4: its bottleneck blocks
            for block in list(stage)[:blocks]:
                block.requires_grad_(False)
        return original(model, batches, optimizer, config, *args, **kwargs)

    caption_lib.train.train_one_epoch = epoch


def step_ratio(names: list[str], repeats: int) -> dict:
    """Median training step (B 32, one caption of 13 tokens each) per variant, interleaved."""
    torch.manual_seed(0)
    vocab = Vocabulary([f"w{i}" for i in range(32)])
    B, L = 32, 13
    captions = torch.randint(4, len(vocab), (B, L))  # (B, L)
    captions[:, 0] = vocab.start_id
    lengths = torch.full((B,), L)  # (B,)
    steps = {}
    for name in names:
        model_config, config = configs(name, 1)
        model = Captioner(vocab, dataclasses.replace(model_config, encoder_weights=None)).train()
        C = model.encoder.cached_channels
        side = model.encoder.cached_side(224)  # 14 after a block of layer3, 7 of layer4
        cached = torch.randn(B, C, side, side).half()  # (B, C, h, w) as stored
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        steps[name] = (model, cached, optimizer, config)

    def step(name: str) -> tuple[float, float]:
        model, cached, optimizer, config = steps[name]
        start, cpu = time.perf_counter(), time.process_time()
        loss, _ = model.cached_loss(cached, captions, lengths, precision=config.precision)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start, time.process_time() - cpu

    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for name in names:
        step(name)  # warm-up
    for _ in range(repeats):
        for name in names:
            times[name].append(step(name))
    wall = {n: statistics.median(w for w, _ in t) for n, t in times.items()}
    cpu = {n: statistics.median(c for _, c in t) for n, t in times.items()}
    result = {"benchmark": "recipe training step, side by side", "batch_images": B,
              "caption_tokens": L, "variants": {n: VARIANTS[n] for n in names},
              "ms_per_step_median": {n: round(1000 * s, 1) for n, s in wall.items()},
              "cpu_ms_per_step_median": {n: round(1000 * s, 1) for n, s in cpu.items()},
              "speedup_over_first": {n: round(wall[names[0]] / s, 2) for n, s in wall.items()},
              "cpu_speedup_over_first": {n: round(cpu[names[0]] / s, 2)
                                         for n, s in cpu.items()},
              "command": "python benchmarks/recipe_experiments.py " + " ".join(sys.argv[1:]),
              "machine": _machine()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recipe_step_ratio.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help=f"names from {list(VARIANTS)}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--step-ratio", action="store_true",
                        help="time the training step of the variants side by side instead")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (on a shared machine 1 per process wastes less)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--extend", action="store_true",
                        help="continue each variant's written curve up to --epochs")
    parser.add_argument("--tag", default="", help="write recipe_<name>__<tag>.json (a letters, "
                        "digits and '-' label, e.g. the machine) instead of recipe_<name>.json")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS and v not in ON_DEFAULT_RUN]
    if args.list or unknown or not args.variants:
        for name in [*VARIANTS, *ON_DEFAULT_RUN]:
            print(f"{name:16s} {_changes(name)}")
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}")
        return
    if args.tag and not args.tag.replace("-", "").isalnum():
        raise SystemExit(f"--tag {args.tag!r}: use letters, digits and '-' only")
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    if args.step_ratio:
        step_ratio(args.variants, args.repeats)
        return
    data = ensure_shapes()
    for name in args.variants:
        originals = [(owner, attr, getattr(owner, attr)) for owner, attr in REPLACED]
        try:
            run_variant(name, args.epochs, data, extend=args.extend, tag=args.tag)
        finally:
            for owner, attr, value in originals:
                setattr(owner, attr, value)


if __name__ == "__main__":
    main()
