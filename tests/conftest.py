"""Shared fixtures. Tests never touch the real workspace: CAPTION_LIB_HOME is a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_workspace(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CAPTION_LIB_HOME", str(tmp_path_factory.getbasetemp() / "workspace"))
    torch.manual_seed(123)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A 36-image shapes data set (24 train, 6 val, 6 test)."""
    from caption_lib.shapes import make_shapes

    return make_shapes(tmp_path_factory.mktemp("data") / "shapes", n_train=24, n_val=6,
                       n_test=6, seed=3)


def tiny_configs(fine_tune=False, epochs=2, attention="soft"):
    """A tiny, fast model and training setting (frozen random encoder unless told)."""
    from caption_lib.model import CaptionerConfig
    from caption_lib.train import TrainConfig

    model = CaptionerConfig(encoder_weights=None, fine_tune=fine_tune, embed_dim=32,
                            decoder_dim=32, attention_dim=32, dropout=0.2,
                            attention=attention)
    config = TrainConfig(epochs=epochs, batch_size=2, lr=3e-3, encoder_lr=1e-3, min_freq=1,
                         captions_per_image=0, val_images=6, bn_images=16, max_decode_len=12)
    return model, config


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_shapes, tmp_path_factory) -> Path:
    """best.pt of a tiny model trained for 2 epochs on `tiny_shapes`."""
    from caption_lib.train import train

    out = tmp_path_factory.mktemp("run")
    model_config, config = tiny_configs(epochs=2)
    with pytest.MonkeyPatch.context() as mp:  # only while training: notebooks keep theirs
        mp.setenv("CAPTION_LIB_HOME", str(tmp_path_factory.getbasetemp() / "workspace"))
        train(tiny_shapes, out, model_config, config, progress=False, log=lambda *_: None)
    return out / "best.pt"


@pytest.fixture(scope="session")
def tiny_hard_checkpoint(tiny_shapes, tmp_path_factory) -> Path:
    """best.pt of a tiny HARD-attention model trained for 2 epochs on `tiny_shapes`."""
    from caption_lib.train import train

    out = tmp_path_factory.mktemp("hard_run")
    model_config, config = tiny_configs(epochs=2, attention="hard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTION_LIB_HOME", str(tmp_path_factory.getbasetemp() / "workspace"))
        train(tiny_shapes, out, model_config, config, progress=False, log=lambda *_: None)
    return out / "best.pt"


def train_config_from_cli(argv: list[str], monkeypatch):
    """The TrainConfig `caption-lib ARGV` hands to `train` (patched to stop there; the
    patch stays for the rest of the test)."""
    from caption_lib import cli

    seen = {}

    def fake_train(data, out, model_config, config, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("caption_lib.train.train", fake_train)
    with pytest.raises(SystemExit):
        cli.main(argv)
    return seen["config"]


def load_tool(name: str):
    """A script of tools/ imported as a module (registered, so its dataclasses work)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
