# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Results: the numbers of this build
#
# Every number on this page is read from a file a program wrote, never typed by hand:
#
# - the book's default run (`recipe("shapes")`, trained in the Training chapter): its
#   settings and its per-epoch history come from the checkpoint, its test-set scores from
#   evaluating that checkpoint now;
# - the performance ratios come from `benchmarks/results/*.json`, written by `make bench`.
#
# Re-running the book after changing the recipe or the benchmarks updates this page.
# Timings depend on the machine that ran them (the benchmark files name it).

# %% tags=["hide-input"]
# Setup. On Colab: install this book's package from its repository (Colab's own PyTorch
# is kept) and, if you want, keep the workspace on Google Drive. Locally `make` has
# installed it already, so nothing happens here
import os
import subprocess
import sys

REPO_URL = "https://github.com/show-attend-tell-book/show-attend-tell-book"
KEEP_ON_DRIVE = False  # Colab: True keeps data, feature cache and runs on your Google Drive
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"], check=True)
    if KEEP_ON_DRIVE:  # the book's page "Running on Colab" says what is kept where
        from google.colab import drive

        drive.mount("/content/drive")
        os.environ["CAPTION_LIB_HOME"] = "/content/drive/MyDrive/caption_lib"

# %% tags=["parameters"]
# Parameters: the data set whose default run is reported (the same as in chapters 5 and 6)
DATASET = "shapes"
SEED = 0
BENCHMARKS = "../benchmarks/results"  # relative to notebooks/, where the book runs this page

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
import dataclasses
import json
import re
from pathlib import Path

from IPython.display import Markdown, display

import caption_lib
from caption_lib.evaluate import evaluate
from caption_lib.model import Captioner
from caption_lib.train import ensure_trained, recipe

device = caption_lib.pick_device("auto")
caption_lib.seed_everything(SEED)
if DATASET == "shapes":
    data_dir = caption_lib.ensure_shapes()
else:
    from caption_lib.download import prepare_flickr8k

    data_dir = prepare_flickr8k()


def table(header: list[str], rows: list[list]) -> Markdown:
    """A Markdown table (numbers as they come: no rounding beyond the files' own)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


print(f"caption_lib {caption_lib.__version__} on {device}")

# %% [markdown]
# ## The default run
#
# `ensure_trained` loads the finished run of the Training chapter (it trains it only on a
# machine where that chapter has not run yet). Its settings:

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
model_config, config = recipe(DATASET)
run = ensure_trained(data_dir, model_config, config, device=device, progress=False,
                     log=lambda *_: None)  # its log names this machine's paths
settings = {**dataclasses.asdict(model_config), **dataclasses.asdict(config)}
display(table(["setting", "value"], [[f"`{k}`", v] for k, v in settings.items()]))

# %% [markdown]
# Training, epoch by epoch (the checkpoint's history; seconds are this build machine's):

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
columns = ["epoch", "train_loss", "val_loss", "val_bleu4", "val_semantic_f1", "lr", "seconds"]
display(table(columns, [[f"{row[c]:.4g}" if c in row else "" for c in columns]
                        for row in run.history]))
best = max(run.history, key=lambda row: row["val_bleu4"])
total_s = sum(row["seconds"] for row in run.history)
print(f"{len(run.history)} epochs in {total_s:.0f} s ({total_s / len(run.history):.0f} s an epoch); "
      f"best validation BLEU-4 {best['val_bleu4']:.2f} at epoch {best['epoch']}")
# `encoder_weights` above is what the recipe asks for; offline it falls back to random
print(f"encoder weights this run used: {run.model.encoder.weights_used}; trained encoder "
      f"stages: {', '.join(run.model.encoder.trained_stages) or 'none (frozen)'}")

# %% [markdown]
# ## Quality on the test set
#
# The checkpoint with the best validation BLEU-4 (`best.pt`), scored on the test images
# it never saw, with greedy decoding and with beam search (beam of 3). BLEU, CIDEr and
# ROUGE-L are multiplied by 100, as captioning papers report them; semantic F1 and
# grounding are between 0 and 1 (see the Inference chapter).

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
model = Captioner.load(run.out_dir / "best.pt", map_location=device).eval()
scores = {beam: evaluate(model, data_dir, "test", beam_size=beam, meteor=False, device=device,
                         progress=False).scores
          for beam in (1, 3)}
metrics = ["bleu1", "bleu4", "cider", "rougeL", "semantic_f1", "grounding"]
display(table(["decoding", *metrics],
              [[f"{'greedy' if beam == 1 else f'beam {beam}'}",
                *(f"{s[m]:.3f}" if m in s else "n/a" for m in metrics)]
               for beam, s in scores.items()]))

# %%
# a loose floor, as in the Training chapter: a broken pipeline fails here
assert scores[1]["bleu4"] > 10

# %% [markdown]
# ## Performance: the benchmark ratios
#
# Each file of `benchmarks/results/` is one benchmark's output (`make bench` rewrites
# them). Below, every ratio and speed-up each file holds, with the number of CPU threads
# it ran on.

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
def ratios(record: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a benchmark record whose name says it is a ratio or a speed-up."""
    found = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(ratios(value, f"{name}."))
        elif isinstance(value, (int, float)) and re.search(r"ratio|speedup|_over_", name):
            found[name] = value
    return found


folder = Path(BENCHMARKS)
if folder.is_dir():
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        display(Markdown(f"**`{path.name}`**: {record.get('benchmark', path.stem)} "
                         f"(CPU threads: {record.get('threads', '?')})"))
        display(table(["ratio", "value"],
                      [[f"`{name}`", f"{value:g}×"] for name, value in ratios(record).items()]))
else:
    print(f"{folder} is not here: the benchmark results live in the repository ({REPO_URL})")
