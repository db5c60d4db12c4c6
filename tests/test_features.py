"""The feature cache: hit, miss, invalidation, interrupted extraction, bf16 accuracy."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from caption_lib import features as feat
from caption_lib.encoder import EncoderCNN
from caption_lib.errors import CaptionLibError


@pytest.fixture(scope="module")
def encoder():
    return EncoderCNN(weights=None, fine_tune="layer4").eval()


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _count_calls(monkeypatch):
    """Images run through a frozen part (calls on cached maps, which finish a prefix's
    cache, are not counted: only inputs with 3 channels are images)."""
    calls = []
    real = feat.extract_frozen

    def counting(frozen, images, fast=True):
        calls.append(len(images) if images.size(1) == 3 else 0)
        return real(frozen, images, fast)

    monkeypatch.setattr(feat, "extract_frozen", counting)
    return calls


def test_miss_then_hit(encoder, images, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    store = feat.cached_features(encoder, images, cache_root=tmp_path / "c", image_size=64,
                                 batch_size=2, progress=False)
    assert store.shape == (5, 1024, 4, 4) and sum(calls) == 5
    assert store[1].dtype == torch.float16 and store[1].shape == (1024, 4, 4)
    again = feat.cached_features(encoder, images, cache_root=tmp_path / "c", image_size=64,
                                 progress=False)
    assert sum(calls) == 5, "a cache hit must not run the encoder"
    assert torch.equal(again[torch.tensor([3, 0])], torch.stack([store[3], store[0]]))


def test_cached_values_are_the_frozen_output(encoder, images, tmp_path):
    store = feat.cached_features(encoder, images[:2], cache_root=tmp_path, image_size=64,
                                 fast=False, progress=False)
    x = feat._Images(images[:2], 64)[1].unsqueeze(0)  # (1, 3, 64, 64)
    assert torch.allclose(store[1].float(), encoder.extract(x)[0], rtol=1e-2, atol=1e-2)


def test_key_changes_invalidate(encoder, images, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    root = tmp_path / "c"
    feat.cached_features(encoder, images, cache_root=root, image_size=64, progress=False)
    os.utime(images[2], ns=(1, 1))  # an image changed on disk
    feat.cached_features(encoder, images, cache_root=root, image_size=64, progress=False)
    frozen = EncoderCNN(weights=None)  # another stage: layer4 output
    other = feat.cached_features(frozen, images, cache_root=root, image_size=64, progress=False)
    # a frozen random encoder finishes the layer3 cache just made: no image runs again
    assert sum(calls) == 10 and other.shape == (5, 2048, 2, 2)
    assert len(list(root.iterdir())) == 3


def test_a_frozen_random_encoder_is_finished_from_the_layer3_cache(encoder, images, tmp_path,
                                                                  monkeypatch):
    calls = _count_calls(monkeypatch)
    frozen = EncoderCNN(weights=None).eval()  # nothing trains: cached up to layer4
    direct = feat.cached_features(frozen, images, cache_root=tmp_path, image_size=64,
                                  progress=False)
    # no layer3 cache yet (e.g. Colab's random-weights comparison): from the images
    assert sum(calls) == 5 and "from" not in direct.meta["key"]
    layer3 = feat.cached_features(encoder, images, cache_root=tmp_path, image_size=64,
                                  progress=False)  # the offline recipe's cache
    assert sum(calls) == 10 and "from" not in layer3.meta["key"]
    derived = feat.cached_features(frozen, images, cache_root=tmp_path, image_size=64,
                                   progress=False)
    # now finished by layer4 alone from the layer3 cache, keyed as such: no image runs,
    # and the entry made from the images is not taken for it
    assert sum(calls) == 10 and derived.meta["key"]["from"] == "layer3"
    assert derived.meta["from"] == str(layer3.path) and derived.path != direct.path
    assert len(list(tmp_path.glob("resnet50-*"))) == 3
    cos = F.cosine_similarity(derived[:5].float().flatten(1), direct[:5].float().flatten(1))
    assert bool((cos > 0.99).all()), cos


def test_data_parallel_processes_agree_on_a_miss(encoder, images, tmp_path, monkeypatch):
    """Rank 1 looks after rank 0 has finished a prefix's cache alone: it must still take
    the miss path and wait at its barrier (else it skips it and meets rank 0 at the next
    split's barrier, before that cache exists: a crash seen under torchrun)."""
    feat.cached_features(encoder, images, cache_root=tmp_path, image_size=64, progress=False)
    frozen = EncoderCNN(weights=None).eval()  # finished from the layer3 cache above
    done = feat.cached_features(frozen, images, cache_root=tmp_path, image_size=64,
                                progress=False)  # what rank 0 has just written
    from caption_lib import distributed

    answers = iter([[1.0]])  # the first agreement: rank 0 had missed
    monkeypatch.setattr(distributed, "all_reduce_sum",
                        lambda values: next(answers, [float(v) for v in values]))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    waits = []
    monkeypatch.setattr(distributed, "barrier", lambda: waits.append(1))
    calls = _count_calls(monkeypatch)
    seen = feat.cached_features(frozen, images, cache_root=tmp_path, image_size=64,
                                progress=False)
    assert waits == [1] and calls == []  # waited for rank 0, computed nothing itself
    assert seen.path == done.path and torch.equal(seen[:5], done[:5])


def test_the_key_is_where_the_frozen_part_ends(encoder, images, tmp_path):
    root = tmp_path / "c"
    stores = {}
    for fine_tune in ("layer4.1", "layer4.2"):
        block = EncoderCNN(weights=None, fine_tune=fine_tune).eval()
        stores[fine_tune] = feat.cached_features(block, images[:2], cache_root=root,
                                                 image_size=64, fast=False, progress=False)
        x = torch.stack([feat._Images(images[:2], 64)[i] for i in range(2)])  # (2, 3, 64, 64)
        want = block.extract(x)  # (2, 2048, 2, 2): the output of the last frozen block
        assert torch.allclose(stores[fine_tune][torch.arange(2)].float(), want,
                              rtol=1e-2, atol=1e-2)
    stores["layer4"] = feat.cached_features(encoder, images[:2], cache_root=root,
                                            image_size=64, fast=False, progress=False)
    stages = {k: s.meta["key"]["stage"] for k, s in stores.items()}
    assert stages == {"layer4.1": "layer4.0", "layer4.2": "layer4.1", "layer4": "layer3"}
    assert sorted(p.name.split("-")[1] for p in root.iterdir()) == sorted(stages.values())
    assert not torch.equal(stores["layer4.1"][0], stores["layer4.2"][0])


def test_calibration_before_caching_is_seeded_and_keyed(images, tmp_path):
    a, b = (EncoderCNN(weights=None, fine_tune="layer4.2").eval() for _ in range(2))
    uncalibrated = a.frozen_fingerprint()
    assert feat.calibrate_frozen(a, images, images=3, seed=1, image_size=64) == 3
    assert feat.calibrate_frozen(a, images, images=3, seed=1, image_size=64) == 0  # done
    feat.calibrate_frozen(b, images, images=3, seed=1, image_size=64)
    assert a.frozen_fingerprint() == b.frozen_fingerprint() != uncalibrated
    assert feat.calibrate_frozen(EncoderCNN(weights=None, fine_tune="layer4"), images) == 0
    keys = [feat.cache_key(e, images, 64) for e in (a, EncoderCNN(weights=None,
                                                                    fine_tune="layer4.2"))]
    assert keys[0]["stage"] == keys[1]["stage"] == "layer4.1"
    assert keys[0]["frozen_fingerprint"] != keys[1]["frozen_fingerprint"]


def test_interrupted_extraction_leaves_no_valid_cache(encoder, images, tmp_path, monkeypatch):
    real = feat.extract_frozen
    calls = []

    def dies_on_second_batch(frozen, images, fast=True):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(frozen, images, fast)

    monkeypatch.setattr(feat, "extract_frozen", dies_on_second_batch)
    root = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        feat.cached_features(encoder, images, cache_root=root, image_size=64, batch_size=2,
                             progress=False)
    assert list(root.iterdir()) == [], "no partial cache may remain"
    monkeypatch.setattr(feat, "extract_frozen", real)
    store = feat.cached_features(encoder, images, cache_root=root, image_size=64,
                                 progress=False)
    assert len(store) == 5 and np.isfinite(store.array).all()


def test_missing_image_is_named(encoder, images, tmp_path):
    with pytest.raises(CaptionLibError, match="9.png"):
        feat.cached_features(encoder, [*images, tmp_path / "9.png"], cache_root=tmp_path,
                             progress=False)


def test_bf16_channels_last_is_close_to_fp32(encoder):
    x = torch.randn(2, 3, 96, 96)
    fp32 = feat.extract_frozen(encoder.frozen, x, fast=False).flatten(1)  # (2, C*h*w)
    fast = feat.extract_frozen(encoder.frozen, x, fast=True).flatten(1)
    assert torch.nn.functional.cosine_similarity(fp32, fast).min() >= 0.999


def test_pieces_and_folding_change_nothing_but_rounding(encoder):
    x = torch.randn(5, 3, 64, 64)
    whole = feat.extract_frozen(encoder.frozen, x, fast=False, piece=5)  # (5, 1024, 4, 4)
    pieces = feat.extract_frozen(encoder.frozen, x, fast=False, piece=2)  # 2 + 2 + 1 images
    assert torch.allclose(pieces, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())
    folded = feat.inference_copy(encoder.frozen, fast=True)  # what the fast cache runs
    assert not [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert feat.inference_copy(encoder.frozen, fast=False) is encoder.frozen
    cos = F.cosine_similarity(feat.extract_frozen(folded, x).flatten(1), whole.flatten(1))
    assert bool((cos > 0.999).all()), cos


def test_frozen_copies_of_the_same_weights_share_one_cache_key(images):
    """`freeze_named`: the stage a run froze and the same weights loaded from elsewhere
    (another `source`) key one cache; one changed value, or another stage, keys another.
    The names the logs print still say where the weights came from."""
    from caption_lib.model import freeze_named

    def frozen(source: str, nudge: float = 0.0) -> EncoderCNN:
        encoder = EncoderCNN(weights=None, fine_tune="layer4").eval()
        with torch.no_grad():
            encoder.trainable[0][0].conv1.weight[0, 0, 0, 0] += nudge
        return freeze_named(encoder, source)

    a, b, other = frozen("run after epoch 7"), frozen("run/best.pt"), frozen("x", 1e-3)
    assert a.weights_used != b.weights_used and "best.pt" in b.weights_used
    keys = [feat.cache_key(e, images, 64) for e in (a, b, other)]
    assert keys[0] == keys[1]
    assert keys[0]["weights"] != keys[2]["weights"]
    assert "sha256:" in keys[0]["weights"] and "best.pt" not in keys[0]["weights"]
    plain = EncoderCNN(weights=None, fine_tune="layer4")
    assert feat.cache_key(plain, images, 64)["weights"] == plain.weights_used == "random(seed=0)"
