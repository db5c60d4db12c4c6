"""Train every run the chapters load, on the console, before the book is built.

`make runs` (a prerequisite of `make book` and `make test`) runs this script: it builds
the shapes data set of the workspace (`ensure_shapes`) and trains, with their progress
bars, the runs chapters 5 and 7 ask for (`ensure_trained` of the same configs, so the same
run folders: `train.run_dir_for` hashes data path and settings). The chapters then find
the finished runs and load them instead of training for minutes behind a silent
"Executing notebook". Runs that are already complete are only reported (a few seconds);
an interrupted one continues where it stopped.

    python tools/book_runs.py            # build the data, train what is missing
    python tools/book_runs.py --list     # the run folders, nothing trained
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from caption_lib.errors import CaptionLibError
from caption_lib.model import CaptionerConfig, read_checkpoint
from caption_lib.train import TrainConfig, ensure_trained, recipe, run_dir_for, same_features_runs

HARD_EPOCHS = 2  # notebooks/07_hard_attention.py's EPOCHS (tests/test_book_runs.py checks it)
COMPARE_EPOCHS = 2  # notebooks/05_training.py's COMPARE_EPOCHS (checked there too)


def book_runs(dataset: str = "shapes") -> dict[str, tuple[CaptionerConfig, TrainConfig]]:
    """label -> (model config, training config) of the runs notebooks/05_training.py
    trains from the data alone (chapter 6 and the results page load its default run).
    Keep in step with the chapter: tests/test_book_runs.py compares the run folders with
    the chapter's code. The decoders trained on the default run's encoder need its
    checkpoint: see `same_features_book_runs`."""
    model_config, config = recipe(dataset)
    return {
        "default run (chapter 5, 6, results)": (model_config, config),
        "frozen encoder, attention (chapter 5)": (
            dataclasses.replace(model_config, fine_tune=False),
            dataclasses.replace(config, epochs=2)),
    }


def same_features_book_runs(data_dir: Path, dataset: str = "shapes"
                            ) -> dict[str, tuple[CaptionerConfig, TrainConfig]]:
    """The decoders the chapters train on the default run's frozen encoder: chapter 5's
    attention / no-attention pair and chapter 7's soft / hard pair (the soft decoder is
    one run for both chapters when their epochs agree). {} while the default run has no
    best.pt yet."""
    model_config, config = recipe(dataset)
    default = run_dir_for(data_dir, model_config, config)
    if not (default / "best.pt").is_file():
        return {}
    runs = {}
    for chapter, epochs, decoders in ((5, COMPARE_EPOCHS, ("soft", "none")),
                                      (7, HARD_EPOCHS, ("soft", "hard"))):
        pairs = same_features_runs(default, model_config, config, epochs, decoders=decoders)
        for name, configs in pairs.items():
            folder = run_dir_for(data_dir, *configs)
            if all(run_dir_for(data_dir, *known) != folder for known in runs.values()):
                what = {"none": "no-attention"}.get(name, f"{name} attention")
                runs[f"{what} decoder on the default run's encoder (chapter {chapter})"] = configs
    return runs


def finished(out_dir: Path, config: TrainConfig) -> int | None:
    """The number of epochs of a complete run in `out_dir` (all `config.epochs`, or
    stopped early by the trainer's rule), None when there is none or it is unfinished."""
    from caption_lib.train import _stale

    try:
        extra = read_checkpoint(out_dir / "last.pt")["extra"]
    except CaptionLibError:
        return None
    history = json.loads(extra.get("history", "[]"))
    if extra.get("epoch", 0) >= config.epochs or _stale(history, config):
        return int(extra.get("epoch", 0))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the run folders and exit")
    args = parser.parse_args(argv)
    from caption_lib.shapes import ensure_shapes

    start = time.perf_counter()
    print("== shapes data set (generated once into the workspace)", flush=True)
    data_dir = ensure_shapes()
    shares = {"shapes data set": time.perf_counter() - start}
    for runs in (book_runs, lambda: same_features_book_runs(data_dir)):
        for label, (model_config, config) in runs().items():
            began = time.perf_counter()
            _train_or_report(label, data_dir, model_config, config, args.list)
            shares[label] = time.perf_counter() - began
    print(f"== runs ready in {time.perf_counter() - start:.0f} s: "
          + "; ".join(f"{label} {seconds:.0f} s" for label, seconds in shares.items()),
          flush=True)
    return 0


def _train_or_report(label: str, data_dir: Path, model_config: CaptionerConfig,
                     config: TrainConfig, listing: bool) -> None:
    """Train one run with its progress bars, or say that it is complete (or, when
    `listing`, only print its folder)."""
    out_dir = run_dir_for(data_dir, model_config, config)
    epochs = finished(out_dir, config)
    if listing or epochs is not None:
        state = "complete" if epochs is not None else "not trained yet"
        print(f"== {label}: {out_dir.name} ({state}"
              + (f", {epochs} epochs)" if epochs is not None else ")"), flush=True)
        return
    print(f"== training {label}: {config.epochs} epochs into {out_dir}", flush=True)
    ensure_trained(data_dir, model_config, config, device="auto", progress=True)


if __name__ == "__main__":
    raise SystemExit(main())
