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
With ImageNet weights the whole network is frozen, as in the paper. Offline there are no
ImageNet weights; a frozen *random* ResNet gives features too weak to learn from, so the
offline recipe fine-tunes `layer4` on cached `layer3` outputs (`fine_tune="auto"` picks
this by itself).

BatchNorm while fine-tuning: the trainable stage runs in train mode (batch statistics)
during training; its running statistics are then re-estimated over training data with
`recalibrate_batchnorm` before evaluation, so that eval mode uses statistics of the final
weights rather than a stale exponential average of earlier ones.
"""

from __future__ import annotations

import os
import sys
import urllib.error
from collections.abc import Iterable

import torch
from torch import nn
from torchvision import transforms as T
from torchvision.models import ResNet50_Weights, resnet50

from caption_lib.errors import CaptionLibError

STRICT_ENV = "CAPTION_LIB_STRICT_WEIGHTS"
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
# children of torchvision's resnet50 after dropping avgpool and fc, by stage
_STAGE_OF_CHILD = ("stem", "stem", "stem", "stem", "layer1", "layer2", "layer3", "layer4")


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
    """Stages that train: False/None -> none; "layer4" -> layer4; "layer3" -> layer3+4;
    True/"all" -> all; "auto" -> none with pretrained weights, layer4 without."""
    if fine_tune == "auto":
        fine_tune = False if pretrained else "layer4"
    if fine_tune in (False, None, "none"):
        return ()
    if fine_tune in (True, "all"):
        return STAGES
    if fine_tune not in STAGES:
        raise CaptionLibError(f"fine_tune={fine_tune!r}: use False, 'auto', 'all' or one of {STAGES}")
    return STAGES[STAGES.index(fine_tune):]


class EncoderCNN(nn.Module):
    """ResNet-50 without its pooling and classifier: images -> (B, P, 2048) region features.

    Args:
        weights: "DEFAULT" (ImageNet, downloaded when reachable) or None (random init).
        fine_tune: which stages train: False (the paper: all frozen), "layer4", "layer3",
            "all", or "auto" (frozen with ImageNet weights, "layer4" with random ones).
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
        self.pretrained = not self.weights_used.startswith("random")
        self.trained_stages = _stages_to_train(fine_tune, self.pretrained)
        self.fine_tune = self.trained_stages[0] if self.trained_stages else False
        children = list(resnet.children())[:-2]  # drop avgpool and fc, as the seed does
        split = next((i for i, s in enumerate(_STAGE_OF_CHILD) if s in self.trained_stages),
                     len(children))
        self.frozen = nn.Sequential(*children[:split])
        self.trainable = nn.Sequential(*children[split:])
        self.frozen.requires_grad_(False)
        self.frozen.eval()
        self.pool = nn.AdaptiveAvgPool2d(grid) if grid else nn.Identity()
        self.grid = grid

    @property
    def cached_stage(self) -> str:
        """Name of the stage whose output the feature cache stores (the frozen part's end)."""
        frozen_stages = [s for s in STAGES if s not in self.trained_stages]
        return frozen_stages[-1] if frozen_stages else "image"

    def train(self, mode: bool = True) -> EncoderCNN:
        """Like nn.Module.train, but the frozen part always stays in eval mode."""
        super().train(mode)
        self.frozen.eval()
        return self

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Run the frozen part: (B, 3, H, W) -> (B, C, h, w), the tensor the cache stores."""
        return self.frozen(images)  # (B, 1024, 14, 14) for layer3, (B, 2048, 7, 7) frozen

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
        """A cheap checksum of the frozen weights (to detect a mismatch at load time)."""
        with torch.no_grad():
            return float(sum(p.double().abs().sum() for p in self.frozen.parameters()))


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
