"""The encoder of "Show, Attend and Tell": ResNet-50 cut before pooling, as region features.

Xu et al. (2015) describe an image by the last convolutional feature map of a CNN, one
vector per spatial position ("annotation vectors"). With ResNet-50 (He et al. 2016) and a
224x224 input:

    (B, 3, 224, 224) -> resnet without avgpool/fc -> (B, 2048, 7, 7)
                     -> permute(0, 2, 3, 1)       -> (B, 7, 7, 2048)
                     -> view(B, -1, 2048)         -> (B, 49, 2048)

Letters: B batch, C channels, P = H'*W' regions (49), E encoder dim (2048).

The network is split in two: `frozen` (never trained, so its output can be cached once
per image; see `caption_lib.features`) and `trainable` (the stages being fine-tuned).
The split may also fall inside a stage, between two of its bottleneck blocks:
`fine_tune="layer4.1"` caches the output of `layer4[0]` (B, 2048, 7, 7) and trains
`layer4[1:]`, about half the cost of a training step through the whole of `layer4`.
With ImageNet weights the whole network is frozen, as in the paper. Offline there are no
ImageNet weights; a frozen *random* ResNet gives features too weak to learn from, so the
offline recipe fine-tunes `layer4` on cached `layer3` outputs (`fine_tune="auto"` picks
this by itself).

BatchNorm while fine-tuning: the trainable stage runs in train mode (batch statistics)
during training; its running statistics are then re-estimated over training data with
`recalibrate_batchnorm` before evaluation, so that eval mode uses statistics of the final
weights rather than a stale exponential average of earlier ones. When training starts
inside a stage, the stage's frozen blocks get statistics of the data once, before the
features are cached (`calibrate_frozen_batchnorm`; checkpoints store them).
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
import urllib.error
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import transforms as T
from torchvision.models import ResNet50_Weights, resnet50

from caption_lib.errors import CaptionLibError

STRICT_ENV = "CAPTION_LIB_STRICT_WEIGHTS"
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
# children of torchvision's resnet50 after dropping avgpool and fc, by stage
_STAGE_OF_CHILD = ("stem", "stem", "stem", "stem", "layer1", "layer2", "layer3", "layer4")
_CHANNELS = {"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
_STRIDES = {"image": 1, "stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}  # bottleneck blocks per stage


def load_resnet50(weights: str | None = "DEFAULT", strict: bool | None = None,
                  init_seed: int = 0) -> tuple[nn.Module, str]:
    """Return (resnet50, name of the weights actually used).

    `weights`: "DEFAULT" / "IMAGENET1K_V1" / "IMAGENET1K_V2" (downloaded by torchvision
    into its cache on first use) or None for random init. When the download fails
    (offline: `URLError`, an `OSError`), fall back to random init with one clear message,
    unless `strict` (or the environment variable CAPTION_LIB_STRICT_WEIGHTS=1) asks for an
    error. Random init is seeded by `init_seed`, so the frozen part of a random encoder is
    reproducible and need not be stored in checkpoints.
    """
    if strict is None:
        strict = os.environ.get(STRICT_ENV, "") not in ("", "0")
    if weights is not None and str(weights).lower() not in ("none", "random"):
        try:
            enum = ResNet50_Weights[str(weights)] if weights != "DEFAULT" else ResNet50_Weights.DEFAULT
        except KeyError as err:
            names = ", ".join(["DEFAULT", *ResNet50_Weights.__members__])
            raise CaptionLibError(f"unknown ResNet-50 weights {weights!r} (use {names} or None)") from err
        try:
            return resnet50(weights=enum), enum.name
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            if strict:
                raise CaptionLibError(
                    f"ImageNet weights {enum.name} for ResNet-50 could not be downloaded "
                    f"from {enum.url} ({reason}); strict mode is on") from err
            print(f"caption_lib: ImageNet weights {enum.name} could not be downloaded "
                  f"({reason}); using a RANDOMLY initialised ResNet-50 (seed {init_seed}). "
                  f"Set {STRICT_ENV}=1 to make this an error.", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = resnet50(weights=None)
    return model, f"random(seed={init_seed})"


def _stages_to_train(fine_tune: bool | str | None, pretrained: bool) -> tuple[str, ...]:
    """What trains, from where training starts to the end of the network.

    False/None -> nothing; "layer4" -> layer4; "layer3" -> layer3+4; True/"all" -> all;
    "auto" -> nothing with pretrained weights, "layer4" without. A block of a stage
    ("layer4.1", torchvision's module name) starts inside it: "layer4.1" trains layer4's
    blocks 1 and 2, ("layer4.1", "layer4.2"); "layer4.0" is the same as "layer4".
    """
    if fine_tune == "auto":
        fine_tune = False if pretrained else "layer4"
    if fine_tune in (False, None, "none"):
        return ()
    if fine_tune in (True, "all"):
        return STAGES
    stage, dot, block = str(fine_tune).partition(".")
    if (not isinstance(fine_tune, str) or stage not in STAGES
            or (dot and not (stage in _BLOCKS and block.isdigit()
                               and int(block) < _BLOCKS[stage]))):
        raise CaptionLibError(
            f"fine_tune={fine_tune!r}: use False, 'auto', 'all', a stage {STAGES} or a block "
            f"where training starts, e.g. 'layer4.1' (blocks per stage: {_BLOCKS})")
    later = STAGES[STAGES.index(stage) + 1:]
    if not block or int(block) == 0:
        return (stage, *later)
    return (*(f"{stage}.{k}" for k in range(int(block), _BLOCKS[stage])), *later)


class EncoderCNN(nn.Module):
    """ResNet-50 without its pooling and classifier: images -> (B, P, 2048) region features.

    Args:
        weights: "DEFAULT" (ImageNet, downloaded when reachable) or None (random init).
        fine_tune: where training starts (everything after it trains too): False (the
            paper: all frozen), a stage ("layer4", "layer3", ...), a block of a stage
            ("layer4.1": layer4's last two blocks; "layer4.2": its last one), "all", or
            "auto" (frozen with ImageNet weights, "layer4" with random ones).
        grid: optional output grid (e.g. 14 for a 14x14 = 196-region map, as some
            tutorials use); None keeps the network's own 7x7 for 224x224 inputs.
        strict: raise instead of falling back to random weights when offline.
        init_seed: seed of the random init (used only when not pretrained).
    """

    encoder_dim = 2048

    def __init__(self, weights: str | None = "DEFAULT", fine_tune: bool | str | None = False,
                 grid: int | None = None, strict: bool | None = None, init_seed: int = 0):
        super().__init__()
        resnet, self.weights_used = load_resnet50(weights, strict, init_seed)
        self.cache_name = self.weights_used  # what the feature cache is keyed by (`freeze`)
        self.pretrained = not self.weights_used.startswith("random")
        self.trained_stages = _stages_to_train(fine_tune, self.pretrained)
        self.fine_tune = self.trained_stages[0] if self.trained_stages else False
        children = list(resnet.children())[:-2]  # drop avgpool and fc, as the seed does
        start, _, block = (self.trained_stages or ("",))[0].partition(".")
        split = next((i for i, s in enumerate(_STAGE_OF_CHILD) if s == start), len(children))
        frozen, trainable = children[:split], children[split:]
        if block:  # training starts inside a stage: its first blocks join the frozen part
            frozen.append(trainable[0][:int(block)])
            trainable[0] = trainable[0][int(block):]
        self.frozen = nn.Sequential(*frozen)
        self.trainable = nn.Sequential(*trainable)
        self.frozen.requires_grad_(False)
        self.frozen.eval()
        self.frozen_calibrated = False  # see `calibrate_frozen_batchnorm`
        if not self.trained_stages and not self.pretrained:
            # a frozen RANDOM ResNet: its layer4 output can be finished from the layer3
            # cache of the offline recipe (fine-tuning layer4), when that exists
            # (`features._prefix_to_finish`). Not registered as a submodule: the same
            # modules as self.frozen[:-1], nothing new to save.
            head = self.frozen[:-1]  # stem .. layer3
            self.__dict__["prefix"] = _Prefix(head, self.weights_used, "layer3", _checksum(head),
                                              optional=True)
        self.pool = nn.AdaptiveAvgPool2d(grid) if grid else nn.Identity()
        self.grid = grid

    @property
    def cached_stage(self) -> str:
        """Where the frozen part ends, i.e. what the feature cache stores: a stage
        ("layer3"), a block ("layer4.0" when training starts at "layer4.1") or "image"."""
        if not self.trained_stages:
            return STAGES[-1]
        stage, _, block = self.trained_stages[0].partition(".")
        if block:
            return f"{stage}.{int(block) - 1}"
        index = STAGES.index(stage)
        return STAGES[index - 1] if index else "image"

    @property
    def reads_cache_in_convolutions(self) -> bool:
        """Whether the trained part starts at a stage's first block, which reads its input
        only in convolutions (conv1 and the downsampling shortcut): under autocast those
        cast it to the autocast dtype, so it may be handed over in that dtype at once
        (`Captioner.encode_cached`). A later block adds its input to its output too."""
        return bool(self.trained_stages) and "." not in self.cached_stage

    @property
    def cached_channels(self) -> int:
        """Channels C of the cached tensor (B, C, h, w)."""
        return _CHANNELS.get(self.cached_stage.partition(".")[0], 3)

    def cached_side(self, image_size: int = 224) -> int:
        """Side h = w of the cached tensor (B, C, h, w) for square images of `image_size`
        (224: 14 after any block of layer3, 7 after one of layer4)."""
        return image_size // _STRIDES[self.cached_stage.partition(".")[0]]

    def train(self, mode: bool = True) -> EncoderCNN:
        """Like nn.Module.train, but the frozen part always stays in eval mode."""
        super().train(mode)
        self.frozen.eval()
        return self

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Run the frozen part: (B, 3, H, W) -> (B, C, h, w), the tensor the cache stores."""
        return self.frozen(images)  # (B, 1024, 14, 14) for layer3, (B, 2048, 7, 7) layer4.k

    def forward_cached(self, x: torch.Tensor) -> torch.Tensor:
        """Finish the encoder from a cached frozen output: (B, C, h, w) -> (B, P, 2048)."""
        x = self.trainable(x)  # (B, 2048, 7, 7)
        x = self.pool(x)  # (B, 2048, g, g)
        x = x.permute(0, 2, 3, 1)  # (B, 7, 7, 2048)
        return x.reshape(x.size(0), -1, x.size(-1))  # (B, 49, 2048)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) -> (B, 49, 2048)."""
        return self.forward_cached(self.extract(images))

    def frozen_fingerprint(self) -> float:
        """A cheap checksum of the frozen weights (to detect a mismatch at load time), and of
        the frozen BatchNorm statistics when they were calibrated (so the cache sees them)."""
        with torch.no_grad():
            state = self.frozen_batchnorm_state()
            return _checksum(self.frozen) + float(sum(v.double().abs().sum() for v in state.values()))

    # -- the frozen blocks of a partly trained stage ("layer4.1", "layer4.2") ------------

    def frozen_batchnorms(self) -> list[nn.BatchNorm2d]:
        """BatchNorm layers of the frozen blocks of the stage training starts in (empty
        when training starts at a stage boundary or nothing trains)."""
        if not self.trained_stages or "." not in self.trained_stages[0]:
            return []
        return [m for m in self.frozen[-1].modules() if isinstance(m, nn.BatchNorm2d)]

    def frozen_batchnorm_state(self) -> dict[str, torch.Tensor]:
        """The calibrated statistics of `frozen_batchnorms` (what checkpoints store), or {}."""
        if not self.frozen_calibrated:
            return {}
        return {k: v for k, v in self.frozen[-1].state_dict().items()
                if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}

    def load_frozen_batchnorm_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `frozen_batchnorm_state()` (from a checkpoint)."""
        if not self.frozen_batchnorms():
            raise CaptionLibError(f"frozen BatchNorm statistics stored, but fine_tune="
                                  f"{self.fine_tune!r} has no frozen blocks in a trained stage")
        unexpected = self.frozen[-1].load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise CaptionLibError(f"frozen BatchNorm statistics do not fit fine_tune="
                                  f"{self.fine_tune!r} (unexpected: {unexpected[:3]})")
        self.frozen_calibrated = True

    def freeze(self, weights_used: str, cache_name: str | None = None) -> EncoderCNN:
        """Freeze the trained stages too (a fine-tuned encoder reused under a new decoder).

        The whole network becomes the frozen, cached part, named `weights_used`. Its old
        frozen part stays reachable as `prefix`, so that the feature cache can finish its
        already cached output instead of running the images again (`caption_lib.features`).
        `cache_name` (default `weights_used`) keys its feature cache: a name of the weights'
        content lets every copy of the same weights share one cache.
        """
        self.prefix = _Prefix(self.frozen, self.cache_name, self.cached_stage,
                              self.frozen_fingerprint())
        self.frozen = nn.Sequential(*self.frozen, *self.trainable)
        self.trainable = nn.Sequential()
        self.trained_stages, self.fine_tune = (), False
        self.frozen.requires_grad_(False)
        self.frozen.eval()  # BatchNorm: the statistics the stage was evaluated with
        self.weights_used, self.cache_name = weights_used, cache_name or weights_used
        return self


def _checksum(module: nn.Module) -> float:
    """Sum of |w| over the parameters (float64): `frozen_fingerprint`'s weight part."""
    return float(sum(p.double().abs().sum() for p in module.parameters()))


class _Prefix(nn.Module):
    """The first children of an encoder's frozen part, whose output has a feature cache of
    its own (the part a frozen fine-tuned encoder had before `freeze`, or a frozen random
    encoder's stem .. layer3): the cache can finish that output instead of running the
    images again (`caption_lib.features`)."""

    def __init__(self, frozen: nn.Sequential, cache_name: str, cached_stage: str,
                 fingerprint: float, optional: bool = False) -> None:
        super().__init__()
        self.optional = optional  # used only when its cache exists already
        self.frozen = frozen  # the same modules, not a copy
        self.cache_name, self.cached_stage = cache_name, cached_stage  # its cache's key
        self.size = len(frozen)  # children of the full network it covers
        self.fingerprint = fingerprint

    def frozen_fingerprint(self) -> float:
        return self.fingerprint

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.frozen(images)  # (B, C, h, w)


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of a frozen ResNet part for inference, each BatchNorm folded into the
    convolution before it; `module` itself is not changed.

    In eval mode a BatchNorm is an affine map per channel, y = s * x + t with
    s = gamma / sqrt(var + eps) and t = beta - s * mean, so a convolution followed by it
    is one convolution with weight s * W (per output channel) and bias s * b + t
    (`torch.nn.utils.fusion.fuse_conv_bn_eval`). Same output up to rounding, and one
    pass over the activations fewer per layer: on a CPU the frozen part's time goes as
    much to those passes (BatchNorm, ReLU, the residual adds) as to the convolutions.
    Pairs folded: in an `nn.Sequential`, a Conv2d directly followed by a BatchNorm2d
    (ResNet's stem and downsample branches); in any other module, children `convN` and
    `bnN` (torchvision's Bottleneck). A BatchNorm in train mode is refused: with batch
    statistics it is not a fixed affine map.
    """
    if any(m.training for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
        raise CaptionLibError("fold_batchnorm: a BatchNorm is in train mode; call .eval() "
                              "first (only running statistics can be folded)")
    folded = copy.deepcopy(module)
    for parent in list(folded.modules()):
        for conv_name, bn_name in list(_conv_bn_pairs(parent)):
            fused = fuse_conv_bn_eval(getattr(parent, conv_name), getattr(parent, bn_name))
            setattr(parent, conv_name, fused)  # same place among the children
            setattr(parent, bn_name, nn.Identity())
    return folded


def _conv_bn_pairs(parent: nn.Module) -> Iterator[tuple[str, str]]:
    """Names (conv, bn) of the children of `parent` that `fold_batchnorm` folds."""
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        for conv, bn in itertools.pairwise(names):
            if isinstance(children[conv], nn.Conv2d) and isinstance(children[bn], nn.BatchNorm2d):
                yield conv, bn
        return
    for name, child in children.items():
        bn = "bn" + name.removeprefix("conv")
        if (name.startswith("conv") and isinstance(child, nn.Conv2d)
                and isinstance(children.get(bn), nn.BatchNorm2d)):
            yield name, bn


def image_transform(image_size: int = 224) -> T.Compose:
    """PIL image -> normalised (3, image_size, image_size) tensor.

    Mean, std and interpolation come from torchvision's `ResNet50_Weights.DEFAULT.transforms()`.
    Unlike that classification preset (resize 232, centre-crop 224), the whole image is
    resized to a square: captions describe the whole picture, and the 7x7 attention grid
    must cover all of it so that overlays line up with the image.
    """
    preset = ResNet50_Weights.DEFAULT.transforms()
    return T.Compose([
        T.Resize((image_size, image_size), interpolation=preset.interpolation, antialias=True),
        T.ToTensor(),  # (3, H, W) in [0, 1]
        T.Normalize(mean=preset.mean, std=preset.std),
    ])


@torch.no_grad()
def recalibrate_batchnorm(encoder: EncoderCNN, batches: Iterable[torch.Tensor],
                          device: torch.device | str = "cpu") -> int:
    """Re-estimate the running statistics of the trainable BatchNorm layers.

    `batches` yields cached frozen outputs (B, C, h, w). Statistics are reset and averaged
    over all batches with equal weight (momentum=None), so eval mode afterwards uses the
    statistics of the current weights. Returns the number of samples seen.
    """
    was_training = encoder.training
    seen = recalibrate_bn_statistics(encoder.trainable, batches, device)
    encoder.train(was_training)
    return seen


@torch.no_grad()
def recalibrate_bn_statistics(module: nn.Module, batches: Iterable[torch.Tensor],
                              device: torch.device | str = "cpu") -> int:
    """`recalibrate_batchnorm` for any module: reset the BatchNorm running statistics,
    average them over `batches` (equal weight per batch), restore momentum and mode.

    Returns the number of samples seen (0, and nothing run, without BatchNorm layers).
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    was_training = module.training
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    module.train()
    seen = 0
    for x in batches:
        module(x.to(device, torch.float32))  # updates the running statistics
        seen += x.size(0)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    module.train(was_training)
    return seen


@torch.no_grad()
def calibrate_frozen_batchnorm(encoder: EncoderCNN, batches: Iterable[torch.Tensor],
                               fast: bool = True) -> int:
    """Statistics of the data for the frozen blocks of a partly trained stage.

    Untrained BatchNorm layers in eval mode (running mean 0, variance 1) do not normalise:
    the output of the frozen `layer4[0]` of a random ResNet-50 has a mean near 8 and a
    standard deviation near 12 on the shapes images, and it reaches the decoder through
    the identity paths of the trained blocks unnormalised (fine-tuning `layer4.1` then
    learned nothing in an epoch: `benchmarks/results/recipe_layer4.1-uncalibrated.json`). A trained
    stage does not have the problem: its first block renormalises its input path.

    So, once before the features are cached: `batches` of images (B, 3, S, S) run through
    the frozen part, the blocks of the split stage in train mode, and their statistics are
    averaged over all batches with equal weight (momentum=None), then frozen again (eval
    mode). Returns the number of images seen (0 when there is nothing to calibrate).
    `fast`: the stages before run in bf16 autocast + channels_last, as extraction does.
    """
    norms = encoder.frozen_batchnorms()
    if not norms:
        return 0
    head, blocks = encoder.frozen[:-1], encoder.frozen[-1]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    blocks.train()
    seen = 0
    for images in batches:
        if fast:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=fast):
            x = head(images)  # (B, C, h, w), the split stage's input
        blocks(x.float())  # (B, C', h', w'), updates the statistics
        seen += images.size(0)
    for m in norms:
        m.momentum = 0.1
    encoder.frozen.eval()
    encoder.frozen_calibrated = seen > 0
    return seen
