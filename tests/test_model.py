"""Captioner: config, forward, and checkpoints (round trip, fresh process, foreign files)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

from caption_lib import Captioner, CaptionerConfig, CaptionLibError, Vocabulary
from caption_lib.model import FORMAT, read_checkpoint

CONFIG = CaptionerConfig(encoder_weights=None, fine_tune="layer4", embed_dim=8, decoder_dim=8,
                         attention_dim=8, dropout=0.0, alpha_c=0.5)


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.build(["a red circle", "a blue square above a red circle"])


@pytest.fixture(scope="module")
def model(vocab):
    torch.manual_seed(0)
    return Captioner(vocab, CONFIG).eval()


def _inputs(vocab):
    gen = torch.Generator().manual_seed(0)
    cached = torch.randn(2, 1024, 14, 14, generator=gen)  # layer3 output (B, 1024, 14, 14)
    ids = [vocab.encode("a red circle"), vocab.encode("a blue square")]
    captions = torch.tensor([ids[0] + [0] * (len(ids[1]) - len(ids[0])), ids[1]])  # (2, L)
    lengths = torch.tensor([len(i) for i in ids])  # (2,)
    return cached, captions, lengths


def test_config_json_round_trip_and_unknown_fields():
    assert CaptionerConfig.from_json(CONFIG.to_json()) == CONFIG
    with pytest.raises(ValueError, match="unknown config fields"):
        CaptionerConfig.from_json(json.dumps({"nope": 1}))


def test_forward_shapes_and_loss(model, vocab):
    cached, captions, lengths = _inputs(vocab)
    with torch.no_grad():
        features = model.encode_cached(cached)
        logits, alphas = model.forward_cached(cached, captions, lengths)
        loss, parts = model.loss(features, captions, lengths)
    assert features.shape == (2, 49, 2048)
    assert logits.shape == (2, captions.size(1) - 1, len(vocab))
    assert alphas.shape == (2, captions.size(1) - 1, 49)
    assert model.encoder.weights_used == "random(seed=0)"
    assert torch.isfinite(loss) and parts["tokens"] == float((lengths - 1).sum())


def test_save_load_round_trip_gives_identical_outputs(model, vocab, tmp_path):
    cached, captions, lengths = _inputs(vocab)
    path = model.save(tmp_path / "run" / "model.pt",
                      extra={"epoch": 3, "history": {"loss": [2.0, 1.5]},
                             "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}})
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    raw = read_checkpoint(path)
    assert raw["format"] == FORMAT and json.loads(raw["config"])["decoder_dim"] == 8
    assert raw["encoder_weights_used"] == "random(seed=0)"
    # only the trainable encoder part is stored (layer4), not the frozen stem..layer3
    assert raw["encoder_trainable"] and all(k.startswith("0.") for k in raw["encoder_trainable"])
    loaded = Captioner.load(path).eval()
    assert loaded.config == model.config and loaded.vocab.itos == vocab.itos
    assert loaded.extra["epoch"] == 3 and loaded.extra["history"]["loss"] == [2.0, 1.5]
    with torch.no_grad():
        a = model.forward_cached(cached, captions, lengths)
        b = loaded.forward_cached(cached, captions, lengths)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_load_in_a_fresh_process_gives_identical_outputs(model, vocab, tmp_path):
    cached, captions, lengths = _inputs(vocab)
    path = model.save(tmp_path / "model.pt")
    torch.save({"cached": cached, "captions": captions, "lengths": lengths}, tmp_path / "in.pt")
    code = (
        "import sys, torch\n"
        "from caption_lib import Captioner\n"
        "m = Captioner.load(sys.argv[1]).eval()\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad():\n"
        "    logits, alphas = m.forward_cached(x['cached'], x['captions'], x['lengths'])\n"
        "torch.save({'logits': logits, 'alphas': alphas}, sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "in.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=120)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        logits, alphas = model.forward_cached(cached, captions, lengths)
    assert torch.equal(out["logits"], logits) and torch.equal(out["alphas"], alphas)


def _error(path) -> str:
    with pytest.raises(CaptionLibError) as info:
        Captioner.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_foreign_and_damaged_files_fail_with_one_line(model, tmp_path):
    good = model.save(tmp_path / "good.pt")
    data = good.read_bytes()

    assert "not found" in _error(tmp_path / "missing.pt")

    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 40)
    assert "not a readable caption_lib checkpoint" in _error(tmp_path / "random.pt")

    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    assert "not a readable caption_lib checkpoint" in _error(tmp_path / "truncated.pt")

    torch.save(model.decoder.state_dict(), tmp_path / "plain.pt")
    assert "no format marker; found a plain state_dict" in _error(tmp_path / "plain.pt")

    payload = read_checkpoint(good)
    torch.save({**payload, "format": "someone.else/9"}, tmp_path / "other.pt")
    assert "format 'someone.else/9'" in _error(tmp_path / "other.pt")

    edited = {**payload, "decoder": dict(payload["decoder"])}
    edited["decoder"]["fc.bias"] = edited["decoder"]["fc.bias"] + 1.0
    torch.save(edited, tmp_path / "edited.pt")
    assert "checksum" in _error(tmp_path / "edited.pt")

    torch.save({**payload, "config": "{not json"}, tmp_path / "config.pt")
    assert "bad config or vocabulary" in _error(tmp_path / "config.pt")

    torch.save({**payload, "encoder_fingerprint": payload["encoder_fingerprint"] * 1.01},
               tmp_path / "frozen.pt")
    assert "fingerprint mismatch" in _error(tmp_path / "frozen.pt")

    # a flipped byte inside the stored weights: the zip's CRC or our checksum catches it
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    assert re.search(r"damaged checkpoint|not a readable", _error(tmp_path / "flipped.pt"))


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    assert "not a readable caption_lib checkpoint" in _error(tmp_path / "evil.pt")


def test_calibrated_frozen_statistics_are_checkpointed(vocab, tmp_path):
    from caption_lib.encoder import calibrate_frozen_batchnorm

    config = CaptionerConfig(encoder_weights=None, fine_tune="layer4.2", embed_dim=8,
                             decoder_dim=8, attention_dim=8, dropout=0.0)
    model = Captioner(vocab, config).eval()
    calibrate_frozen_batchnorm(model.encoder, [torch.randn(2, 3, 64, 64)], fast=False)
    path = model.save(tmp_path / "calibrated.pt")
    assert "encoder_frozen_batchnorm" in read_checkpoint(path)
    loaded = Captioner.load(path).eval()
    assert loaded.encoder.frozen_calibrated
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), model.encode(images))
    assert "encoder_frozen_batchnorm" not in read_checkpoint(
        Captioner(vocab, config).save(tmp_path / "plain.pt"))  # nothing calibrated


def test_deep_output_round_trips_and_old_configs_read_as_the_single_layer(vocab, tmp_path):
    """A deep-output model's checkpoint loads with its L_h, L_z; a config written before
    the option (no "deep_output" key) reads as the single output layer; a bad value is
    refused in one line."""
    torch.manual_seed(0)
    deep = Captioner(vocab, dataclasses.replace(CONFIG, deep_output=True)).eval()
    assert deep.decoder.fc.weight.shape == (len(vocab), CONFIG.embed_dim)
    loaded = Captioner.load(deep.save(tmp_path / "deep.pt")).eval()
    assert loaded.config.deep_output and hasattr(loaded.decoder, "out_z")
    cached, captions, lengths = _inputs(vocab)
    with torch.no_grad():
        a = deep.forward_cached(cached, captions, lengths)[0]
        b = loaded.forward_cached(cached, captions, lengths)[0]
    assert torch.equal(a, b)
    old = json.loads(CONFIG.to_json())
    del old["deep_output"]
    assert CaptionerConfig.from_json(json.dumps(old)).deep_output is False
    with pytest.raises(CaptionLibError) as info:
        CaptionerConfig(deep_output="yes")
    assert "deep_output='yes'" in str(info.value) and "\n" not in str(info.value)


def test_a_trained_stage_reads_its_cache_in_the_autocast_dtype_with_the_same_result(vocab):
    """Under bf16 autocast, a stage trained from its first block gets the cached input in
    bf16 at once (its convolutions would cast it so): the features, the loss and every
    gradient equal those of the fp32 input that autocast casts; a stage trained from a
    later block (its input also joins the residual sum) keeps fp32 input."""
    cached, captions, lengths = _inputs(vocab)
    cached = cached.half()  # the cache's dtype
    torch.manual_seed(0)
    model = Captioner(vocab, CONFIG).train()
    assert model.encoder.reads_cache_in_convolutions
    seen = []
    hook = model.encoder.trainable.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))

    def run(features_of):
        model.zero_grad()
        features = features_of()  # (2, 49, 2048)
        loss, _ = model.loss(features, captions, lengths)
        loss.backward()
        return features.detach(), [p.grad.clone() for p in model.encoder.trainable.parameters()]

    def from_fp32():  # what encode_cached did before: fp32 input, cast by the convolutions
        x = cached.float().contiguous(memory_format=torch.channels_last)  # (2, 1024, 14, 14)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.encoder.forward_cached(x).float()

    fp32_features, fp32_grads = run(from_fp32)
    features, grads = run(lambda: model.encode_cached(cached, "bf16"))
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert torch.equal(features, fp32_features)
    assert all(torch.equal(a, b) for a, b in zip(grads, fp32_grads))
    later = Captioner(vocab, dataclasses.replace(CONFIG, fine_tune="layer4.1"))
    assert not later.encoder.reads_cache_in_convolutions
    assert not Captioner(vocab, dataclasses.replace(CONFIG, fine_tune="none")
                         ).encoder.reads_cache_in_convolutions
