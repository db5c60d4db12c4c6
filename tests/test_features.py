"""The feature cache: hit, miss, invalidation, interrupted extraction, bf16 accuracy."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
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
    calls = []
    real = feat.extract_frozen

    def counting(encoder, images, fast=True):
        calls.append(len(images))
        return real(encoder, images, fast)

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
    assert sum(calls) == 15 and other.shape == (5, 2048, 2, 2)
    assert len(list(root.iterdir())) == 3


def test_interrupted_extraction_leaves_no_valid_cache(encoder, images, tmp_path, monkeypatch):
    real = feat.extract_frozen
    calls = []

    def dies_on_second_batch(encoder, images, fast=True):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(encoder, images, fast)

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
    fp32 = feat.extract_frozen(encoder, x, fast=False).flatten(1)  # (2, C*h*w)
    fast = feat.extract_frozen(encoder, x, fast=True).flatten(1)
    assert torch.nn.functional.cosine_similarity(fp32, fast).min() >= 0.999
