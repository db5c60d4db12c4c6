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
