"""tools/book_runs.py (`make runs`): it trains exactly the runs the chapters then load."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from types import SimpleNamespace

from caption_lib.model import Captioner, CaptionerConfig
from caption_lib.train import recipe, run_dir_for
from caption_lib.vocab import Vocabulary
from conftest import ROOT, load_tool

CHAPTER = ROOT / "notebooks" / "05_training.py"


def _chapter_runs() -> list[tuple]:
    """(model config, training config) of chapter 5's `ensure_trained` calls that need no
    earlier run, from its own code: the main run's configs, and its `variants` dict as
    first written (the decoders on the main run's encoder are added to it afterwards:
    `test_the_runs_on_the_default_runs_encoder_are_trained_too`)."""
    source = CHAPTER.read_text()
    assert re.search(r"^DATASET = \"shapes\"", source, re.MULTILINE)
    assert re.search(r"^model_config, config = recipe\(DATASET\)$", source, re.MULTILINE)
    calls = re.findall(r"ensure_trained\(data_dir, (\w+(?:\[[^]]*\]\[\d\])?), ?\s*(\S+?),", source)
    assert ("model_config", "config") in calls and ("variant", "budget") in calls, calls
    tree = ast.parse(source)
    def assigned(name: str):
        (value,) = [n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    and [getattr(t, "id", None) for t in n.targets] == [name]]
        return compile(ast.Expression(value), str(CHAPTER), "eval")

    model_config, config = recipe("shapes")
    offline = SimpleNamespace(model=SimpleNamespace(encoder=SimpleNamespace(pretrained=False)))
    namespace = {"dataclasses": dataclasses, "model_config": model_config, "config": config,
                 "result": offline}  # the main run as shapes has it: a random-init encoder
    namespace["frozen_config"] = eval(assigned("frozen_config"), namespace)
    chapter_variants = eval(assigned("variants"), namespace)
    return [(model_config, config), *chapter_variants.values()]


def _folders(runs, data_dir="/data/shapes-v2") -> set[str]:
    return {run_dir_for(data_dir, m, c).name for m, c in runs}


def test_the_tool_trains_the_run_folders_the_chapter_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTION_LIB_HOME", str(tmp_path))
    tool = load_tool("book_runs")
    chapter = _folders(_chapter_runs())
    assert len(chapter) == 2 and _folders(tool.book_runs().values()) == chapter
    # the default run is today's recipe, its folder the name pinned in test_layout
    assert run_dir_for("/data/shapes", *tool.book_runs()[next(iter(tool.book_runs()))]).name \
        == "shapes-0652a01b78"


def test_a_different_budget_is_another_folder(tmp_path, monkeypatch):
    """The comparison above would notice a tool that drifted from the chapter."""
    monkeypatch.setenv("CAPTION_LIB_HOME", str(tmp_path))
    runs = list(load_tool("book_runs").book_runs().values())
    model_config, config = runs[1]
    drifted = [*runs[:1], (model_config, dataclasses.replace(config, epochs=3)), *runs[2:]]
    assert _folders(drifted) != _folders(_chapter_runs())


def _fake_run(out_dir, epoch: int, history: list[dict]) -> None:
    config = CaptionerConfig(encoder_weights=None, fine_tune=False, embed_dim=4,
                             decoder_dim=4, attention_dim=4)
    model = Captioner(Vocabulary(["a"]), config)
    model.save(out_dir / "last.pt", extra={"epoch": epoch, "history": json.dumps(history)})


def test_complete_runs_are_found_not_trained(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPTION_LIB_HOME", str(tmp_path))
    tool = load_tool("book_runs")
    data_dir = tmp_path / "shapes"
    monkeypatch.setattr("caption_lib.shapes.ensure_shapes", lambda: data_dir)
    trained = []
    monkeypatch.setattr(tool, "ensure_trained",
                        lambda d, m, c, **kw: trained.append(run_dir_for(d, m, c).name))
    runs = list(tool.book_runs().values())
    done = run_dir_for(data_dir, *runs[0])
    done.mkdir(parents=True)
    _fake_run(done, runs[0][1].epochs, [{"val_bleu4": 1.0}] * runs[0][1].epochs)
    half = run_dir_for(data_dir, *runs[1])  # interrupted after 1 epoch: resumed by training
    half.mkdir(parents=True)
    _fake_run(half, 1, [{"val_bleu4": 1.0}])
    assert tool.main([]) == 0  # the default run has no best.pt: nothing depends on it yet
    assert trained == [half.name]
    out = capsys.readouterr().out
    assert f"{done.name} (complete, {runs[0][1].epochs} epochs)" in out
    shares = re.search(r"^== runs ready in \d+ s: (.*)$", out, flags=re.MULTILINE).group(1)
    labels = ["shapes data set", *tool.book_runs()]  # each one's seconds: make test's shares
    assert [re.sub(r" \d+ s$", "", part) for part in shares.split("; ")] == labels, shares
    trained.clear()
    assert tool.main(["--list"]) == 0 and trained == []


def test_an_early_stopped_run_is_complete(tmp_path):
    tool = load_tool("book_runs")
    _, config = recipe("shapes")
    history = [{"val_bleu4": b, "val_loss": loss}  # best at 2, then 3 epochs worse
               for b, loss in zip((5.0, 9.0, 8.0, 7.0, 6.0), (2.0, 1.0, 1.1, 1.2, 1.3))]
    _fake_run(tmp_path, len(history), history)
    assert tool.finished(tmp_path, config) == len(history) < config.epochs
    assert tool.finished(tmp_path / "missing", config) is None



def test_make_book_and_make_test_train_the_runs_first():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^runs: .*\n\t\$\(PY\) tools/book_runs.py$", makefile, flags=re.MULTILINE)
    for target in ("book", "test"):
        assert re.search(rf"^{target}: .*\bruns\b", makefile, flags=re.MULTILINE), target


def test_the_runs_on_the_default_runs_encoder_are_trained_too(tmp_path, monkeypatch):
    """Chapter 5's attention / no-attention pair and chapter 7's soft / hard pair are built
    with `same_features_runs` and the chapters' epochs; the tool trains the same folders
    (the soft decoder once) as soon as the default run has a checkpoint."""
    tool = load_tool("book_runs")
    chapter5_call = (r"same_features_runs\(result\.out_dir, model_config, config, "
                     r"COMPARE_EPOCHS,\s+decoders=\(\"soft\", \"none\"\)\)")
    chapter7_call = r"same_features_runs\(chapter5\.out_dir, model_config, config,\s+EPOCHS\)"
    chapters = {5: ("COMPARE_EPOCHS", chapter5_call, tool.COMPARE_EPOCHS),
                7: ("EPOCHS", chapter7_call, tool.HARD_EPOCHS)}
    for number, (name, call, epochs) in chapters.items():
        (path,) = (ROOT / "notebooks").glob(f"0{number}_*.py")
        source = path.read_text()
        assert re.findall(rf"^{name} = (\d+)", source, flags=re.MULTILINE) == [str(epochs)]
        assert re.search(call, source), path.name
    monkeypatch.setenv("CAPTION_LIB_HOME", str(tmp_path))
    data_dir = tmp_path / "shapes"
    assert tool.same_features_book_runs(data_dir) == {}  # no default run yet: nothing to train
    default = run_dir_for(data_dir, *recipe("shapes"))
    default.mkdir(parents=True)
    _fake_run(default, 1, [])
    (default / "last.pt").rename(default / "best.pt")
    runs = tool.same_features_book_runs(data_dir)
    assert [(m.attention, m.use_attention) for m, _ in runs.values()] == [
        ("soft", True), ("soft", False), ("hard", True)]
    assert [c.epochs for _, c in runs.values()] == [tool.COMPARE_EPOCHS] * 2 + [tool.HARD_EPOCHS]
    assert len({run_dir_for(data_dir, *r) for r in runs.values()}) == 3


def test_same_features_runs_names_its_decoders(tmp_path):
    """"none" is the mean-feature decoder; every decoder gets the epochs asked for and a
    frozen encoder; an unknown decoder name is refused with the names it knows."""
    import pytest

    from caption_lib.train import same_features_runs

    model_config, config = recipe("shapes")
    _fake_run(tmp_path, 1, [])
    (tmp_path / "last.pt").rename(tmp_path / "best.pt")
    runs = same_features_runs(tmp_path, model_config, config, 3, decoders=("none", "soft"))
    assert list(runs) == ["none", "soft"]
    assert [m.use_attention for m, _ in runs.values()] == [False, True]
    assert all(not m.fine_tune and c.epochs == 3 for m, c in runs.values())
    with pytest.raises(ValueError, match="medium.*'hard', 'none', 'soft'"):
        same_features_runs(tmp_path, model_config, config, 3, decoders=("medium",))
