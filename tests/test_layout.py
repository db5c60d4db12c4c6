"""The library's shape: short functions, a module map, settings checked when built."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import caption_lib
from caption_lib import runtime
from caption_lib.errors import CaptionLibError
from caption_lib.model import CaptionerConfig
from caption_lib.runtime import atomic_copy, atomic_write, rng_state, set_rng_state
from caption_lib.train import TrainConfig, recipe, run_dir_for

PACKAGE = Path(caption_lib.__file__).parent
LIMIT = 80  # lines of a function, docstring included


def _functions():
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.name}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_80_lines():
    long = {name: n for name, n in _functions() if n > LIMIT}
    assert not long, f"functions over {LIMIT} lines: {long}"


def test_the_module_map_names_every_module():
    doc = caption_lib.__doc__
    for path in PACKAGE.glob("*.py"):
        if not path.name.startswith("__"):
            assert f"\n        {path.stem} " in doc, f"{path.stem} missing from the map"


def test_argparse_only_in_the_cli():
    users = [p.name for p in PACKAGE.glob("*.py") if "argparse" in p.read_text()]
    assert users == ["cli.py"], users


def test_run_folders_of_todays_recipes_keep_their_names(tmp_path, monkeypatch):
    """Trained runs in a workspace are found by these names: a config change that renames
    them would retrain the book (values from `run_dir_for` before `max_len` was retired;
    flickr8k and coco renamed on purpose when their `alpha_c` went from 1.0 to 0.02, issue 18;
    shapes when its `alpha_c` went from 0.02 to 0, and all three when they took the paper's
    deep output layer, issue 19; shapes again when it took averaged weights, `ema_decay`,
    and when it took its first reference only, `references`, and its decoder's training
    steps in bf16, `precision`, and when its `layer4` stopped training after epoch 7,
    `encoder_epochs`, issue 19; a config without them keeps its folder, and so does one
    where `encoder_epochs` cannot act)."""
    monkeypatch.setenv("CAPTION_LIB_HOME", str(tmp_path))
    names = {name: run_dir_for("/data/shapes", *recipe(name)).name
             for name in ("shapes", "flickr8k", "coco")}
    assert names == {"shapes": "shapes-0652a01b78", "flickr8k": "shapes-e0bc755ee5",
                     "coco": "shapes-17cd6f5ea7"}
    model_config, config = recipe("shapes")
    config.epochs = 2
    model_config.fine_tune = False
    assert run_dir_for("/data/shapes", model_config, config).name == "shapes-f9c4e0ad01"
    config.precision = "auto"  # before the decoder's bf16 steps
    assert run_dir_for("/data/shapes", model_config, config).name == "shapes-d9fd6a9142"
    config.encoder_epochs = 0  # no fine-tuned stage: the setting cannot act, same folder
    assert run_dir_for("/data/shapes", model_config, config).name == "shapes-d9fd6a9142"
    model_config, config = recipe("shapes")
    config.encoder_epochs = 8  # not before the last epoch: it cannot act either
    assert run_dir_for("/data/shapes", model_config, config).name == "shapes-a769b6890f"
    config.encoder_epochs = 0  # the recipe before layer4 stopped after epoch 7: old folder
    assert run_dir_for("/data/shapes", model_config, config).name == "shapes-a769b6890f"
    config.precision = "auto"  # the recipe before the decoder's bf16 steps: its old folder
    assert run_dir_for("/data/shapes", model_config, config).name == "shapes-906a6e5415"
    config.references = "random"  # the recipe before the first reference: its old folder
    assert run_dir_for("/data/shapes", model_config, config).name == "shapes-ac79c5d5f8"
    config.ema_decay = 0.0  # the recipe before the averaged weights: its old folder
    assert run_dir_for("/data/shapes", model_config, config).name == "shapes-aaab42becd"
    model_config.deep_output = False  # and before the deep output
    assert run_dir_for("/data/shapes", model_config, config).name == "shapes-8f8fb88cf0"


def test_configs_are_checked_when_built():
    with pytest.raises(CaptionLibError, match="unknown schedule 'linear'"):
        TrainConfig(schedule="linear")
    with pytest.raises(CaptionLibError, match="unknown precision 'fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(CaptionLibError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(CaptionLibError, match="grid=14"):
        CaptionerConfig(grid=14)
    with pytest.raises(CaptionLibError, match="dropout"):
        CaptionerConfig(dropout=1.5)


def test_unknown_keys_are_refused_by_both_configs_retired_ones_dropped():
    config = TrainConfig(epochs=3)
    assert TrainConfig.from_dict({**config.__dict__}) == config
    with pytest.raises(ValueError, match="unknown config fields \\['nope'\\]"):
        TrainConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="unknown config fields \\['nope'\\]"):
        CaptionerConfig.from_json('{"nope": 1}')
    # checkpoints written before `max_len` was retired still load
    assert CaptionerConfig.from_json('{"max_len": 20, "embed_dim": 8}').embed_dim == 8


def test_rng_state_round_trip_on_the_cpu():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    set_rng_state(state["cpu"])  # a bare CPU state, as older checkpoints hold it
    assert torch.equal(torch.rand(3), a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rng_state_round_trip_on_cuda():
    torch.cuda.init()
    state = rng_state()
    assert "cuda" in state
    a = torch.rand(3, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda"), a)


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "x.txt"
    with atomic_write(path) as f:
        f.write(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as f:
        f.write(b"half")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.parametrize("links", [True, False])
def test_atomic_copy_keeps_its_bytes_when_the_source_is_rewritten(tmp_path, monkeypatch, links):
    if not links:  # a file system without hard links: a plain copy
        def no_link(*args):
            raise OSError("hard links not supported")

        monkeypatch.setattr(runtime.os, "link", no_link)
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    with atomic_write(last) as f:
        f.write(b"epoch 1")
    atomic_copy(last, best)
    with atomic_write(last) as f:  # the next epoch, not a better one
        f.write(b"epoch 2")
    assert best.read_bytes() == b"epoch 1" and last.read_bytes() == b"epoch 2"
    atomic_copy(last, best)  # replaces an existing copy
    assert best.read_bytes() == b"epoch 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
