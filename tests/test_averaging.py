"""Weight averaging (`TrainConfig.ema_decay`): the formula, the swap, training and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from caption_lib.averaging import WeightAverage
from caption_lib.data import load_dataset, split_records
from caption_lib.errors import CaptionLibError
from caption_lib.evaluate import score_split
from caption_lib.features import workspace_features
from caption_lib.model import Captioner
from caption_lib.train import TrainConfig, train
from conftest import tiny_configs


def test_the_average_follows_its_formula_and_the_swap_gives_the_weights_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)  # not trained: not averaged
    average = WeightAverage(model, decay=0.9)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == average.names == ["0.weight", "0.bias", "1.weight"]
    history = []  # the weights after each step
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update()
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
    # the bias-corrected mean: shares 0.1 * 0.9^(t - s) of step s, divided by their sum;
    # the initial weights have none
    shares = [0.1 * 0.9 ** (3 - s) for s in (1, 2, 3)]
    expected = {n: sum(w * h[n] for w, h in zip(shares, history)) / sum(shares) for n in names}
    assert average.steps == 3
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, a in average.state_dict().items():
        torch.testing.assert_close(a, expected[n])
    averages = {n: a.clone() for n, a in average.state_dict().items()}
    with average.applied():
        for n, p in model.named_parameters():
            assert torch.equal(p, averages[n] if n in averages else trained[n]), n
        assert all(torch.equal(v, trained[n]) for n, v in average.trained().items())
    for n, p in model.named_parameters():
        assert torch.equal(p, trained[n]), f"{n}: the trained weight is back after the block"
    model[0].requires_grad_(False)  # the first layer stops training: it becomes its average
    average.settle(model[0])
    assert torch.equal(model[0].weight, averages["0.weight"])
    assert torch.equal(model[1].weight, trained["1.weight"])
    with torch.no_grad():
        model[1].weight.add_(1.0)
    average.update()  # ... and stays it; the second goes on moving
    assert torch.equal(average.state_dict()["0.weight"], model[0].weight)
    assert not torch.equal(average.state_dict()["1.weight"], averages["1.weight"])
    with pytest.raises(CaptionLibError, match="decay 1.0"):
        WeightAverage(model, decay=1.0)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_a_bad_decay_is_one_clear_line(value):
    with pytest.raises(CaptionLibError, match=rf"TrainConfig.ema_decay={value!r}: must be"):
        TrainConfig(ema_decay=value)


def _averaged_configs(epochs):
    model_config, config = tiny_configs(epochs=epochs)
    config.ema_decay = 0.9
    return model_config, config


def test_training_validates_and_saves_the_average_and_resumes_exactly(tiny_shapes, tmp_path):
    quiet = {"progress": False, "log": lambda *_: None}
    straight = train(tiny_shapes, tmp_path / "a", *_averaged_configs(2), **quiet)
    train(tiny_shapes, tmp_path / "b", *_averaged_configs(1), **quiet)
    resumed = train(tiny_shapes, tmp_path / "b", config=_averaged_configs(2)[1], resume=True,
                    **quiet)
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in straight.history]
    saved = Captioner.load(tmp_path / "a" / "last.pt")
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
        assert torch.equal(value, saved.state_dict()[name]), f"{name}: train returns last.pt's model"
    # the checkpoint's model is the average, and the trained weights ride beside it
    trained = saved.extra["trained_weights"]
    params = dict(saved.named_parameters())
    assert trained.keys() == {n for n, p in params.items() if p.requires_grad}
    assert all(not torch.equal(trained[n], params[n]) for n in trained)
    # validation scored exactly that model, not the trained weights
    records = split_records(load_dataset(tiny_shapes), "val")
    store = workspace_features(saved.encoder, records, progress=False)
    refs = [saved.vocab.encode(r.captions[0])[:40] for r in records]

    def val_loss(model):
        return score_split(model, records, store, max_len=12, references=refs,
                           full=False).scores["loss"]

    assert val_loss(saved) == pytest.approx(straight.history[-1]["val_loss"], rel=1e-5)
    with torch.no_grad():
        for n, p in saved.named_parameters():
            if n in trained:
                p.copy_(trained[n])
    assert val_loss(saved) != pytest.approx(straight.history[-1]["val_loss"], rel=1e-5)


def test_a_stage_that_stops_training_freezes_as_its_average(tiny_shapes, tmp_path):
    model_config, config = tiny_configs(fine_tune="layer4", epochs=2)
    config.encoder_epochs, config.ema_decay = 1, 0.9
    result = train(tiny_shapes, tmp_path / "run", model_config, config, progress=False,
                   log=lambda *_: None)
    saved = Captioner.load(tmp_path / "run" / "last.pt")
    trained = saved.extra["trained_weights"]
    stage = [n for n in trained if n.startswith("encoder.trainable.")]
    decoder = [n for n in trained if n.startswith("decoder.")]
    assert stage and decoder
    params = dict(saved.named_parameters())
    assert all(torch.equal(trained[n], params[n]) for n in stage), "frozen: trained == average"
    assert any(not torch.equal(trained[n], params[n]) for n in decoder)
    assert len(result.history) == 2


def test_the_command_line_sets_the_decay_and_refuses_a_bad_one(tiny_shapes, monkeypatch,
                                                              capsys):
    from caption_lib import cli
    from conftest import train_config_from_cli

    config = train_config_from_cli(["train", "--data", str(tiny_shapes), "--ema-decay", "0.95"],
                                   monkeypatch)
    assert config.ema_decay == 0.95
    assert cli.main(["train", "--data", str(tiny_shapes), "--ema-decay", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["caption-lib: error: TrainConfig.ema_decay=1.5: must be 0 (off) or in (0, 1)"], err
