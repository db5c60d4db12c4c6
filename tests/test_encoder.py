"""EncoderCNN: the seed's shapes, freezing, weights with an offline fallback, BatchNorm."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from caption_lib import encoder as enc
from caption_lib.encoder import (
    EncoderCNN,
    calibrate_frozen_batchnorm,
    fold_batchnorm,
    image_transform,
    load_resnet50,
    recalibrate_batchnorm,
)
from caption_lib.errors import CaptionLibError


@pytest.fixture(scope="module")
def frozen_random():
    return EncoderCNN(weights=None).eval()


@pytest.mark.parametrize("size,regions", [(224, 49), (64, 4), (96, 9), (256, 64)])
def test_region_count_follows_the_input_size(frozen_random, size, regions):
    x = torch.randn(2, 3, size, size)  # (B, 3, S, S)
    assert frozen_random(x).shape == (2, regions, 2048)


def test_the_seed_shapes_step_by_step(frozen_random):
    x = torch.randn(1, 3, 224, 224)
    fmap = frozen_random.trainable(frozen_random.extract(x))  # all frozen: trainable is empty
    assert fmap.shape == (1, 2048, 7, 7)
    seed_way = fmap.permute(0, 2, 3, 1).view(1, -1, 2048)  # the seed's permute + view
    assert torch.equal(frozen_random(x), seed_way)
    # region r is position (r // 7, r % 7) of the map
    assert torch.equal(seed_way[0, 10], fmap[0, :, 1, 3])


def test_optional_grid(frozen_random):
    pooled = EncoderCNN(weights=None, grid=14)
    assert pooled(torch.randn(1, 3, 224, 224)).shape == (1, 196, 2048)


def test_frozen_by_default_no_gradients(frozen_random):
    assert all(not p.requires_grad for p in frozen_random.parameters())
    assert frozen_random.cached_stage == "layer4" and frozen_random.fine_tune is False


def test_fine_tuning_layer4_trains_only_layer4():
    model = EncoderCNN(weights=None, fine_tune="layer4")
    assert model.cached_stage == "layer3"
    model.train()
    assert not model.frozen.training and model.trainable.training  # frozen part stays in eval
    cached = model.extract(torch.randn(2, 3, 64, 64))  # (2, 1024, 4, 4)
    assert cached.shape == (2, 1024, 4, 4) and not cached.requires_grad  # layer3: 1024 channels
    model.forward_cached(cached).sum().backward()
    assert all(p.grad is not None for p in model.trainable.parameters())
    assert all(not p.requires_grad for p in model.frozen.parameters())


def test_fine_tuning_from_a_block_of_layer4():
    model = EncoderCNN(weights=None, fine_tune="layer4.1")
    assert model.trained_stages == ("layer4.1", "layer4.2") and model.fine_tune == "layer4.1"
    assert model.cached_stage == "layer4.0" and model.cached_channels == 2048
    assert len(model.trainable[0]) == 2  # layer4's blocks 1 and 2; block 0 is frozen
    model.train()
    cached = model.extract(torch.randn(2, 3, 64, 64))  # layer4[0] output (2, 2048, 2, 2)
    assert cached.shape == (2, 2048, 2, 2) and not cached.requires_grad
    model.forward_cached(cached).sum().backward()
    assert all(p.grad is not None for p in model.trainable.parameters())
    assert all(not p.requires_grad for p in model.frozen.parameters())
    last = EncoderCNN(weights=None, fine_tune="layer4.2")
    assert last.trained_stages == ("layer4.2",) and last.cached_stage == "layer4.1"
    assert len(last.trainable[0]) == 1


def test_where_training_starts_does_not_change_the_network(frozen_random):
    x = torch.randn(1, 3, 64, 64)  # (B, 3, S, S)
    with torch.no_grad():
        want = frozen_random(x)  # (1, 4, 2048)
        for fine_tune in ("layer4", "layer4.1", "layer4.2", "layer3.5"):
            assert torch.equal(EncoderCNN(weights=None, fine_tune=fine_tune).eval()(x), want)


def test_block_values_name_what_trains():
    assert EncoderCNN(weights=None, fine_tune="layer4.0").trained_stages == ("layer4",)
    inner = EncoderCNN(weights=None, fine_tune="layer3.5")
    assert inner.trained_stages == ("layer3.5", "layer4")
    assert inner.cached_stage == "layer3.4" and inner.cached_channels == 1024


@pytest.mark.parametrize("fine_tune", [False, "layer4", "layer4.1", "layer3.5", "layer3", "all"])
def test_cached_side_is_what_the_frozen_part_returns(fine_tune):
    model = EncoderCNN(weights=None, fine_tune=fine_tune)
    cached = model.extract(torch.randn(1, 3, 64, 64))  # (1, C, h, w)
    assert cached.shape[1:] == (model.cached_channels, model.cached_side(64), model.cached_side(64))


@pytest.mark.parametrize("bad", ["layer4.3", "layer4.", "layer4.x", "layer4.-1", "stem.0",
                                 "layer4[1:]", 4])
def test_bad_fine_tune_values_are_one_clear_error(bad):
    with pytest.raises(CaptionLibError, match=r"fine_tune=.*'layer4.1'") as err:
        enc._stages_to_train(bad, pretrained=False)
    assert "\n" not in str(err.value) and repr(bad) in str(err.value)


def test_auto_fine_tunes_only_without_pretrained_weights(monkeypatch):
    assert EncoderCNN(weights=None, fine_tune="auto").fine_tune == "layer4"
    monkeypatch.setattr(enc, "load_resnet50", lambda *a, **k: (enc.resnet50(), "IMAGENET1K_V2"))
    assert EncoderCNN(weights="DEFAULT", fine_tune="auto").fine_tune is False
    with pytest.raises(CaptionLibError, match="fine_tune='layer9'"):
        EncoderCNN(weights=None, fine_tune="layer9")


def _offline(*args, **kwargs):
    raise urllib.error.URLError("Name or service not known")


def test_offline_falls_back_to_random_with_one_message(monkeypatch, capsys):
    monkeypatch.setattr(enc, "resnet50", lambda weights=None: _offline() if weights else nn.Linear(1, 1))
    monkeypatch.delenv(enc.STRICT_ENV, raising=False)
    _, used = load_resnet50("DEFAULT", init_seed=3)
    assert used == "random(seed=3)"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RANDOMLY initialised" in err and "IMAGENET1K_V2" in err


def test_strict_mode_turns_the_fallback_into_an_error(monkeypatch):
    monkeypatch.setattr(enc, "resnet50", lambda weights=None: _offline())
    with pytest.raises(CaptionLibError, match="could not be downloaded"):
        load_resnet50("DEFAULT", strict=True)
    monkeypatch.setenv(enc.STRICT_ENV, "1")
    with pytest.raises(CaptionLibError, match="strict mode"):
        load_resnet50("DEFAULT")


def test_unknown_weights_name():
    with pytest.raises(CaptionLibError, match="unknown ResNet-50 weights 'IMAGENET9'"):
        load_resnet50("IMAGENET9")


def test_pretrained_weights_are_loaded_from_torchvision_cache(tmp_path, monkeypatch):
    """The real download path, offline: plant a weights file where torchvision caches it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    planted = enc.resnet50().state_dict()
    url = enc.ResNet50_Weights.DEFAULT.url
    target = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    torch.save(planted, target)
    model = EncoderCNN(weights="DEFAULT")
    assert model.weights_used == "IMAGENET1K_V2" and model.pretrained
    assert torch.equal(model.frozen[0].weight, planted["conv1.weight"])


def test_random_init_is_reproducible_from_its_seed():
    a, b, c = (EncoderCNN(weights=None, init_seed=s) for s in (0, 0, 1))
    assert a.frozen_fingerprint() == b.frozen_fingerprint() != c.frozen_fingerprint()
    assert a.weights_used == "random(seed=0)"


def test_image_transform_resizes_the_whole_image():
    from PIL import Image

    x = image_transform(224)(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[0], torch.full((224, 224), (1 - 0.485) / 0.229), atol=1e-4)


def test_recalibrated_batchnorm_uses_statistics_of_the_data():
    model = EncoderCNN(weights=None, fine_tune="layer4").train()
    bn = model.trainable[0][0].bn1
    seen = []
    hook = bn.register_forward_hook(lambda m, i, o: seen.append(i[0].mean(dim=(0, 2, 3))))
    batches = [torch.randn(4, 1024, 4, 4) * 3 + 1 for _ in range(3)]
    assert recalibrate_batchnorm(model, batches) == 12
    hook.remove()
    assert model.training and model.trainable.training
    assert torch.allclose(bn.running_mean, torch.stack(seen).mean(0), atol=1e-5)
    assert bn.momentum == 0.1  # restored


def test_calibrating_the_frozen_blocks_of_a_partly_trained_stage():
    model = EncoderCNN(weights=None, fine_tune="layer4.1")
    stage_level = EncoderCNN(weights=None, fine_tune="layer4")
    assert calibrate_frozen_batchnorm(stage_level, [torch.randn(2, 3, 64, 64)]) == 0
    assert stage_level.frozen_batchnorm_state() == {} and not stage_level.frozen_calibrated
    norms = model.frozen_batchnorms()
    assert len(norms) == 4  # layer4[0]: bn1..bn3 and the downsample's
    before, fingerprint = model.extract(torch.randn(4, 3, 64, 64)), model.frozen_fingerprint()
    seen = []
    hook = norms[0].register_forward_hook(lambda m, i, o: seen.append(i[0].mean(dim=(0, 2, 3))))
    batches = [torch.randn(3, 3, 64, 64) for _ in range(3)]
    assert calibrate_frozen_batchnorm(model, batches, fast=False) == 9
    hook.remove()
    assert torch.allclose(norms[0].running_mean, torch.stack(seen).mean(0), atol=1e-4)
    assert not model.frozen.training and all(m.momentum == 0.1 for m in norms)
    assert model.frozen_calibrated and model.frozen_fingerprint() != fingerprint
    after = model.extract(torch.randn(4, 3, 64, 64))  # (4, 2048, 2, 2)
    assert before.std() > 3 and after.std() < 3, (before.std(), after.std())  # normalised
    assert set(model.frozen_batchnorm_state()) == {
        f"0.{k}" for m in ("bn1", "bn2", "bn3", "downsample.1")
        for k in (f"{m}.running_mean", f"{m}.running_var", f"{m}.num_batches_tracked")}


def test_calibrated_statistics_travel_as_a_state():
    model = EncoderCNN(weights=None, fine_tune="layer4.2")
    calibrate_frozen_batchnorm(model, [torch.randn(2, 3, 64, 64)], fast=False)
    copy = EncoderCNN(weights=None, fine_tune="layer4.2")
    copy.load_frozen_batchnorm_state(model.frozen_batchnorm_state())
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(copy.extract(x), model.extract(x))
    assert copy.frozen_fingerprint() == model.frozen_fingerprint()
    with pytest.raises(CaptionLibError, match="no frozen blocks"):
        EncoderCNN(weights=None, fine_tune="layer4").load_frozen_batchnorm_state(
            model.frozen_batchnorm_state())


def _with_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm of `module` non-trivial statistics and affine parameters
    (a fresh one is the identity map, which would fold into nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                for tensor, low, high in ((m.running_mean, -1, 1), (m.running_var, 0.5, 2),
                                          (m.weight, 0.5, 1.5), (m.bias, -0.5, 0.5)):
                    tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=generator))
    return module.eval()


def test_folded_batchnorm_computes_the_same_function():
    encoder = EncoderCNN(weights=None)
    frozen = _with_statistics(encoder.frozen)  # stem .. layer4
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    folded = fold_batchnorm(frozen)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = frozen(x), folded(x)  # (2, 2048, 2, 2)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # every BatchNorm went into a convolution: the stem's, each bottleneck's three and
    # each downsample branch's
    assert not [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in frozen.modules()) == 53
    # the module it was given is untouched (a copy was folded)
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())


def test_folding_a_module_in_train_mode_is_refused():
    with pytest.raises(CaptionLibError, match="train mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_only_a_convolution_directly_before_its_batchnorm_is_folded():
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    _with_statistics(block)
    folded = fold_batchnorm(block)
    assert isinstance(folded[2], nn.BatchNorm2d)  # a ReLU between them: not one affine map
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(folded(x), block(x))
