"""Command-line conventions every sub-command follows."""

from __future__ import annotations

import pytest

from caption_lib import cli
from caption_lib.errors import CaptionLibError
from caption_lib.runtime import pick_device, seed_everything, workspace_dir


def _failing(sub):
    p = sub.add_parser("explode")

    def run(args):
        raise CaptionLibError("data/x.json:3: caption is empty")

    p.set_defaults(func=run)


def test_user_errors_are_one_line_without_traceback(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_registrars", lambda: [_failing])
    assert cli.main(["explode"]) == 2
    err = capsys.readouterr().err
    assert err == "caption-lib: error: data/x.json:3: caption is empty\n"


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setattr(cli, "_registrars", lambda: [_failing])
    with pytest.raises(CaptionLibError):
        cli.main(["--debug", "explode"])


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(CaptionLibError, match="unknown device 'tpu9'"):
        pick_device("tpu9")


def test_seed_everything_is_reproducible():
    import torch

    seed_everything(7)
    a = torch.rand(3)
    g = seed_everything(7)
    assert torch.equal(a, torch.rand(3))
    expected = torch.rand(2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(2, generator=g), expected)


def test_workspace_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTION_LIB_HOME", str(tmp_path / "ws"))
    assert workspace_dir() == tmp_path / "ws"
    assert (tmp_path / "ws").is_dir()
