"""The trainer: learning, checkpoints, exact resume, determinism, bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from caption_lib import cli
from caption_lib.errors import CaptionLibError
from caption_lib.model import Captioner
from caption_lib.train import (
    TrainConfig,
    ensure_trained,
    recipe,
    run_dir_for,
    same_features_runs,
    train,
)
from conftest import tiny_configs as _configs
from conftest import train_config_from_cli


def _losses(history):
    return [(h["train_loss"], h["val_loss"], h["val_bleu4"]) for h in history]


def test_training_reduces_the_loss_and_writes_checkpoints(tiny_shapes, tmp_path):
    model_config, config = _configs(epochs=3)
    result = train(tiny_shapes, tmp_path / "run", model_config, config, progress=False,
                   log=lambda *_: None)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], losses
    assert losses[-1] < 0.9 * losses[0], losses
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "best.pt").is_file()
    loaded = Captioner.load(tmp_path / "run" / "last.pt")
    assert loaded.extra["epoch"] == 3 and loaded.vocab.itos == result.model.vocab.itos


def test_fine_tuning_layer4_learns_and_recalibrates(tiny_shapes, tmp_path):
    model_config, config = _configs(fine_tune="layer4", epochs=2)
    result = train(tiny_shapes, tmp_path / "ft", model_config, config, progress=False,
                   log=lambda *_: None)
    assert result.model.encoder.trained_stages == ("layer4",)
    first, second = (h["train_loss"] for h in result.history)
    assert second < first
    bn = result.model.encoder.trainable[0][0].bn1
    assert bn.num_batches_tracked.item() == 1, "statistics re-estimated over 16 images in 1 batch"


def test_fine_tuning_from_a_block_calibrates_the_frozen_block_first(tiny_shapes, tmp_path):
    model_config, config = _configs(fine_tune="layer4.2", epochs=1)
    result = train(tiny_shapes, tmp_path / "block", model_config, config, progress=False,
                   log=lambda *_: None)
    encoder = result.model.encoder
    assert encoder.trained_stages == ("layer4.2",) and encoder.frozen_calibrated
    assert all(m.num_batches_tracked.item() == 1 for m in encoder.frozen_batchnorms())
    loaded = Captioner.load(tmp_path / "block" / "last.pt")
    assert loaded.encoder.frozen_fingerprint() == encoder.frozen_fingerprint()


def test_resume_reproduces_the_next_epoch_exactly(tiny_shapes, tmp_path):
    model_config, config = _configs(epochs=2)
    straight = train(tiny_shapes, tmp_path / "a", model_config, config, progress=False,
                     log=lambda *_: None)
    model_config, config = _configs(epochs=1)
    train(tiny_shapes, tmp_path / "b", model_config, config, progress=False, log=lambda *_: None)
    _, config = _configs(epochs=2)
    resumed = train(tiny_shapes, tmp_path / "b", config=config, resume=True, progress=False,
                    log=lambda *_: None)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert _losses(resumed.history) == _losses(straight.history)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_same_seed_same_run(tiny_shapes, tmp_path, monkeypatch):
    # an empty workspace: the first run extracts the features, the second finds them cached
    monkeypatch.setenv("CAPTION_LIB_HOME", str(tmp_path / "workspace"))
    runs = []
    for name in ("x", "y"):
        model_config, config = _configs(epochs=1)
        runs.append(train(tiny_shapes, tmp_path / name, model_config, config, progress=False,
                          log=lambda *_: None))
    assert _losses(runs[0].history) == _losses(runs[1].history)


def test_an_interrupted_checkpoint_write_keeps_the_previous_one(tiny_shapes, tmp_path,
                                                                monkeypatch):
    model_config, config = _configs(epochs=1)
    result = train(tiny_shapes, tmp_path / "r", model_config, config, progress=False,
                   log=lambda *_: None)
    last = tmp_path / "r" / "last.pt"
    before = last.read_bytes()

    def dies(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        result.model.save(last, extra={"epoch": 2})
    assert last.read_bytes() == before
    assert Captioner.load(last).extra["epoch"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]


def test_bad_data_folder_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("caption-lib: error: ") and "nope" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionLibError, match="empty"):
        train(tmp_path / "empty", tmp_path / "out", progress=False)


def test_ensure_trained_reuses_a_finished_run(tiny_shapes):
    model_config, config = _configs(epochs=1)
    first = ensure_trained(tiny_shapes, model_config, config, progress=False, log=lambda *_: None)
    lines = []
    again = ensure_trained(tiny_shapes, model_config, config, progress=False, log=lines.append)
    assert again.out_dir == first.out_dir and again.history == first.history
    assert any(line.startswith("resuming from") for line in lines)
    other = ensure_trained(tiny_shapes, model_config, _configs(epochs=2)[1], progress=False,
                           log=lambda *_: None)
    assert other.out_dir != first.out_dir


def test_cosine_schedule_decays_to_zero_and_resumes_exactly(tiny_shapes, tmp_path,
                                                            monkeypatch):
    model_config, config = _configs(epochs=2)
    config.schedule = "cosine"
    straight = train(tiny_shapes, tmp_path / "a", model_config, config, progress=False,
                     log=lambda *_: None)
    lrs = [h["lr"] for h in straight.history]
    # 24 training images in batches of 2: 12 steps per epoch, half way after epoch 1
    assert lrs[0] == pytest.approx(config.lr * 0.5, rel=1e-6) and lrs[1] == pytest.approx(0.0)

    save = Captioner.save

    def stops_before_epoch_2(self, path, extra=None):  # the run dies after epoch 1
        if extra and extra["epoch"] == 2:
            raise KeyboardInterrupt
        return save(self, path, extra=extra)

    monkeypatch.setattr(Captioner, "save", stops_before_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_shapes, tmp_path / "b", model_config, config, progress=False,
              log=lambda *_: None)
    monkeypatch.setattr(Captioner, "save", save)
    resumed = train(tiny_shapes, tmp_path / "b", resume=True, progress=False,
                    log=lambda *_: None)
    assert _losses(resumed.history) == _losses(straight.history)
    assert [h["lr"] for h in resumed.history] == lrs


def test_unknown_schedule_is_one_clear_error(tiny_shapes, tmp_path):
    model_config, config = _configs(epochs=1)
    config.schedule = "linear"
    with pytest.raises(CaptionLibError, match="unknown schedule 'linear'"):
        train(tiny_shapes, tmp_path / "c", model_config, config, progress=False,
              log=lambda *_: None)


def test_best_epoch_by_bleu4_or_by_loss():
    from caption_lib.train import TrainConfig, is_best_epoch

    history = [{"val_bleu4": 0.0, "val_loss": 2.0}, {"val_bleu4": 58.0, "val_loss": 1.8},
               {"val_bleu4": 0.0, "val_loss": 1.2}]  # a lucky BLEU-4, then a better model
    assert is_best_epoch(history[:2]) and not is_best_epoch(history)
    assert is_best_epoch(history, "loss") and not is_best_epoch(history[:1] + [
        {"val_bleu4": 9.0, "val_loss": 2.1}], "loss")
    assert is_best_epoch(history[:1] + [{"val_bleu4": 0.0, "val_loss": 3.0}])  # ties: later
    with pytest.raises(CaptionLibError, match="best_by"):
        TrainConfig(best_by="bleu")


def test_training_flushes_subnormal_floats_and_switches_it_off_after(tiny_shapes, tmp_path,
                                                                     monkeypatch):
    """On CPU the steps run with subnormals read as zero (x86 works on them many times
    slower); after `train` they are ordinary numbers again."""
    import caption_lib.train as train_module

    tiny = torch.tensor([1e-39])  # subnormal in fp32
    seen, real = [], train_module.train_one_epoch

    def spy(*args, **kwargs):
        seen.append(float(tiny * 1.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", spy)
    model_config, config = _configs(epochs=1)
    train(tiny_shapes, tmp_path, model_config, config, device="cpu", progress=False,
          log=lambda *_: None)
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    assert seen == [0.0]
    assert float(tiny * 1.0) == pytest.approx(1e-39, rel=1e-3)


def _stage_state(model):
    return {k: v.clone() for k, v in model.encoder.trainable.state_dict().items()}


def test_encoder_epochs_freeze_the_stage_and_train_the_decoder_on_its_cache(tiny_shapes,
                                                                           tmp_path):
    model_config, config = _configs(fine_tune="layer4", epochs=1)
    config.encoder_epochs = 1
    lines = []
    first = train(tiny_shapes, tmp_path / "run", model_config, config, progress=False,
                  log=lines.append)
    stage, decoder = _stage_state(first.model), {
        k: v.clone() for k, v in first.model.decoder.state_dict().items()}
    initial = Captioner(first.model.vocab, model_config).encoder.trainable.state_dict()
    assert not torch.equal(initial["0.0.conv1.weight"], stage["0.0.conv1.weight"]), \
        "the stage trains in its epoch"
    _, config = _configs(fine_tune="layer4", epochs=3)
    config.encoder_epochs = 1
    resumed = train(tiny_shapes, tmp_path / "run", config=config, resume=True, progress=False,
                    log=lines.append)
    assert any("frozen after epoch 1" in line for line in lines), lines
    after = _stage_state(resumed.model)  # weights and BatchNorm statistics of epoch 1
    assert all(torch.equal(stage[k], after[k]) for k in stage)
    assert any(not torch.equal(v, resumed.model.decoder.state_dict()[k])
               for k, v in decoder.items()), "the decoder went on training"
    losses = [h["train_loss"] for h in resumed.history]
    assert len(losses) == 3 and losses[2] < losses[0], losses
    # the decoder-only epochs read the stage's output from a cache of its own ...
    from caption_lib.runtime import workspace_dir

    stored = sorted(p.parent.name for p in (workspace_dir() / "features").rglob("meta.json"))
    assert any(name.startswith("resnet50-layer4-") for name in stored), stored
    # ... and validated exactly what the checkpoint gives through the model's own encoder
    from caption_lib.data import load_dataset, split_records
    from caption_lib.evaluate import score_split
    from caption_lib.features import workspace_features

    loaded = Captioner.load(tmp_path / "run" / "last.pt")
    records = split_records(load_dataset(tiny_shapes), "val")
    store = workspace_features(loaded.encoder, records, progress=False)
    refs = [loaded.vocab.encode(r.captions[0])[:config.max_caption_len] for r in records]
    scores = score_split(loaded, records, store, max_len=config.max_decode_len,
                         references=refs, full=False).scores
    assert scores["loss"] == pytest.approx(resumed.history[-1]["val_loss"], rel=1e-2)
    # a decoder on the run's frozen best.pt (chapters 5 and 7) reads that same cache
    pair = same_features_runs(tmp_path / "run", model_config, config, 1, decoders=("soft",))
    train(tiny_shapes, tmp_path / "soft", *pair["soft"], progress=False, log=lambda *_: None)
    after_soft = sorted(p.parent.name for p in (workspace_dir() / "features").rglob("meta.json"))
    assert after_soft == stored, "the same weights, one cache"


def test_encoder_epochs_resume_exactly_and_need_a_trained_stage(tiny_shapes, tmp_path):
    model_config, config = _configs(fine_tune="layer4", epochs=3)
    config.encoder_epochs = 1
    straight = train(tiny_shapes, tmp_path / "a", model_config, config, progress=False,
                     log=lambda *_: None)
    _, config = _configs(fine_tune="layer4", epochs=2)
    config.encoder_epochs = 1
    train(tiny_shapes, tmp_path / "b", model_config, config, progress=False,
          log=lambda *_: None)
    config.epochs = 3
    resumed = train(tiny_shapes, tmp_path / "b", config=config, resume=True, progress=False,
                    log=lambda *_: None)
    assert _losses(resumed.history) == _losses(straight.history)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    # a frozen encoder has no stage to stop: the setting changes nothing
    model_config, config = _configs(epochs=2)
    plain = train(tiny_shapes, tmp_path / "c", model_config, config, progress=False,
                  log=lambda *_: None)
    config.encoder_epochs = 1
    same = train(tiny_shapes, tmp_path / "d", model_config, config, progress=False,
                 log=lambda *_: None)
    assert _losses(plain.history) == _losses(same.history)
    assert run_dir_for(tiny_shapes, model_config, config) == run_dir_for(
        tiny_shapes, model_config, replace(config, encoder_epochs=0)), "same training, one folder"
    shapes = recipe("shapes")[1]  # layer4 stops after epoch 7 of 8 (recipe_bf16-enc7*)
    assert (shapes.encoder_epochs, shapes.epochs) == (7, 8)
    assert recipe("flickr8k")[1].encoder_epochs == 0
    with pytest.raises(CaptionLibError, match="encoder_epochs"):
        TrainConfig(encoder_epochs=-1)


def test_first_references_train_each_image_on_its_first_caption_in_the_same_order():
    """references="first": every image once an epoch with caption 0, in the order the
    random draw would have put the images (the generator's first draw is the order)."""
    from caption_lib.train import CachedSplit

    split = CachedSplit.__new__(CachedSplit)
    split.encoded = [[[1, 2], [1, 3], [1, 4]] for _ in range(7)]  # 7 images, 3 captions each
    drawn = split.epoch_batches(3, 1, torch.Generator().manual_seed(5))
    first = split.epoch_batches(3, 1, torch.Generator().manual_seed(5), references="first")
    assert [[i for i, _ in b] for b in first] == [[i for i, _ in b] for b in drawn]
    assert all(j == 0 for b in first for _, j in b)
    assert any(j != 0 for b in drawn for _, j in b), "the random draw picks other captions"


def test_first_references_need_one_caption_per_image_and_a_known_name():
    with pytest.raises(CaptionLibError, match=r"^TrainConfig.captions_per_image=0: "
                                              r"references='first' trains on one"):
        TrainConfig(references="first", captions_per_image=0)
    with pytest.raises(CaptionLibError, match="unknown references 'last'"):
        TrainConfig(references="last")
    assert TrainConfig(references="first", captions_per_image=1).references == "first"


def test_first_references_train_on_caption_zero_and_the_cli_sets_them(tiny_shapes, tmp_path,
                                                                       monkeypatch):
    """The trainer's batches hold caption 0 of every image; `--references` reaches the
    config; the shapes recipe trains on the first (canonical) reference."""
    import caption_lib.train as train_module
    seen = []
    batch = train_module.CachedSplit.batch

    def spy(self, pairs, weights=None):
        seen.extend(pairs)
        return batch(self, pairs, weights)

    monkeypatch.setattr(train_module.CachedSplit, "batch", spy)
    model_config, config = _configs(epochs=1)
    config.captions_per_image, config.references = 1, "first"
    train(tiny_shapes, tmp_path / "run", model_config, config, device="cpu", progress=False,
          log=lambda *_: None)
    assert seen and {j for _, j in seen} == {0}
    assert len({i for i, _ in seen}) == 24  # every training image
    assert recipe("shapes")[1].references == "first"
    assert recipe("flickr8k")[1].references == "random"
    config = train_config_from_cli(["train", "--data", str(tiny_shapes), "--references",
                                    "random"], monkeypatch)
    assert config.references == "random"


def test_bf16_precision_puts_the_decoders_training_steps_under_cpu_autocast(tiny_shapes,
                                                                            tmp_path,
                                                                            monkeypatch):
    """precision="bf16": the training loss (decoder included) runs under the CPU's bf16
    autocast; "auto" keeps it in fp32 there. The CLI sets it; the shapes recipe uses it;
    an unknown value is one clear line."""
    seen = []
    loss = Captioner.cached_loss

    def spy(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(Captioner, "cached_loss", spy)
    model_config, config = _configs(epochs=1)
    for precision, autocast_on in (("bf16", True), ("auto", False)):
        seen.clear()
        config.precision = precision
        result = train(tiny_shapes, tmp_path / precision, model_config, config, device="cpu",
                       progress=False, log=lambda *_: None)
        assert seen and set(seen) == {autocast_on}, precision
        assert math.isfinite(result.history[-1]["train_loss"])
    assert recipe("shapes")[1].precision == "bf16"
    assert recipe("flickr8k")[1].precision == "auto"
    with pytest.raises(CaptionLibError, match=r"^unknown precision 'fp16' \(use auto or bf16 "
                                              r"or fp32\)$"):
        TrainConfig(precision="fp16")
    config = train_config_from_cli(["train", "--data", str(tiny_shapes), "--precision", "fp32"],
                                   monkeypatch)
    assert config.precision == "fp32"
