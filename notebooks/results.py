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
import math
import re
from pathlib import Path

from IPython.display import Markdown, display

import caption_lib
from caption_lib.evaluate import evaluate
from caption_lib.model import Captioner
from caption_lib.train import ADDED_DEFAULTS, ensure_trained, recipe

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
# ### Beside the paper's Table 1
#
# {cite:t}`xu2015show` report, in their Table 1, BLEU-1..4 and METEOR on Flickr8k (as
# fractions ×100). Below they stand next to this build's test scores. **The rows are not
# comparable**: the paper's captions are human sentences about photographs, with a
# vocabulary of thousands of words and five quite different references per image; the
# shapes captions come from a small grammar, so once a model names the right objects most
# of its $n$-grams match some reference. The paper's rows say what the model reaches on
# real data; ours say that this implementation learns the task it is given.

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
PAPER_TABLE_1_FLICKR8K = {  # Xu et al. 2015, Table 1 (BLEU-1..4, METEOR; ×100)
    "paper, soft attention (Flickr8k)": (67, 44.8, 29.9, 19.5, 18.93),
    "paper, hard attention (Flickr8k)": (67, 45.7, 31.4, 21.3, 20.30),
}
bleu_keys = ["bleu1", "bleu2", "bleu3", "bleu4"]
paper_rows = [[name, *(f"{v:g}" for v in values)] for name, values in PAPER_TABLE_1_FLICKR8K.items()]
ours = [[f"this build, soft attention ({DATASET}, {'greedy' if beam == 1 else f'beam {beam}'})",
         *(f"{s[k]:.1f}" for k in bleu_keys), "not computed here"]
        for beam, s in scores.items()]
display(table(["model", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR"], paper_rows + ours))

# %% [markdown]
# ## Performance: the benchmark ratios
#
# Each file of `benchmarks/results/` is one benchmark's output (`make bench` rewrites
# them). Below, every ratio and speed-up each file holds, under a name that says what is
# compared with what, with the number of CPU threads it ran on, and one sentence that
# reads the table (computed from the same numbers). "Tutorial" is the formulation of
# sgrvinod's PyTorch captioning tutorial, written out in the benchmark (its algorithm,
# not its code).

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
NAMES = {  # a benchmark key -> what it compares
    "ratio_batched_over_tutorial": "batched beam search vs the tutorial's per-image beam search",
    "ratio_batched_over_per_image": "batched beam search vs the library's own beam search one image at a time",
    "ratio_batched_bf16_over_tutorial": "batched beam search in bf16 vs the tutorial's per-image beam search (fp32)",
    "ratio_bf16_over_fp32_batched": "batched beam search, bf16 vs fp32",
    "ratio_per_image_over_tutorial": "the library one image at a time vs the tutorial's per-image beam search",
    "ratio_batched_over_tutorial_fastest_rep": "batched vs tutorial, fastest repetition of each",
    "speedup": "2 processes vs 1 (same global batch)",
    "speedup_vs_tutorial_median.variable": "decoder training step vs the tutorial's, lengths 10-20 (median)",
    "speedup_vs_tutorial_median.fixed": "decoder training step vs the tutorial's, all lengths 20 (median)",
    "speedup_vs_tutorial_min.variable": "decoder training step vs the tutorial's, lengths 10-20 (fastest)",
    "speedup_vs_tutorial_min.fixed": "decoder training step vs the tutorial's, all lengths 20 (fastest)",
    "shrink_time_over_mask_time_median": "time of sort-and-shrink over time of masking only (below 1: shrinking is faster)",
    "extract_speedup": "feature extraction, bf16 + channels_last vs fp32",
    "extract_speedup_folded_pieces_over_bf16": "feature extraction as the cache runs it (BatchNorm folded, a few images a pass) vs bf16 + channels_last on the whole batch",
    "epoch_speedup": "an epoch from the feature cache vs running the CNN at every step",
    "speedup_bf16_over_fp32": "fine-tuned training step, bf16 autocast vs fp32",
    "speedup_auto_over_fp32": "recipe training step, precision 'auto' (the fine-tuned stage in bf16 autocast, the decoder in fp32) vs fp32",
    "speedup_recipe_bf16_over_fp32": "recipe training step, precision 'bf16' (the recipe's: stage and decoder in bf16 autocast) vs fp32",
    "speedup_recipe_bf16_over_auto": "recipe training step, precision 'bf16' vs 'auto' (what the decoder in bf16 adds)",
    "speedup_bf16_autocast_over_fp32_median": "decoder training step, bf16 autocast vs fp32 (median)",
    "speedup_bf16_autocast_vs_tutorial_median.variable": "decoder training step in bf16 autocast vs the tutorial's in fp32, lengths 10-20 (median)",
    "ratio_hard_over_soft": "hard-attention step time over soft (wall clock; above 1: hard is slower)",
    "ratio_all_sampled_over_soft": "hard attention, every caption sampled, over soft (wall clock)",
    "cpu_ratio_hard_over_soft": "hard-attention step over soft, in CPU time",
    "speedup_flushed_over_plain.saturating": "decoder step on saturating features (chapter 5's frozen random encoder), subnormals flushed vs not",
    "speedup_flushed_over_plain.ordinary": "decoder step on ordinary features (the control: no subnormals arise), flushed vs not",
    "speedup_chunks_over_one_piece.fp32_beam": "attention scores of a beam-search step (96 rows), in chunks vs in one piece, fp32",
    "speedup_chunks_over_one_piece.fp32_greedy": "attention scores of a greedy step (32 rows), in chunks vs in one piece, fp32",
    "speedup_chunks_over_one_piece.bf16_beam": "attention scores of a beam-search step (96 rows), in chunks vs in one piece, bf16",
    "speedup_chunks_over_one_piece.bf16_greedy": "attention scores of a greedy step (32 rows), in chunks vs in one piece, bf16",
    "speedup_sigmoid_form.fp32_beam": "attention scores of a beam-search step (96 rows) in chunks, tanh from a sigmoid vs the tanh itself, fp32",
    "speedup_sigmoid_form.fp32_greedy": "the same for a greedy step (32 rows), fp32",
    "speedup_sigmoid_form.bf16_beam": "the same for a beam-search step (96 rows), bf16 inputs",
    "speedup_sigmoid_form.bf16_greedy": "the same for a greedy step (32 rows), bf16 inputs",
    "speedup_compiled_over_eager": "fine-tuned layer4 forward + backward, torch.compile (inductor) vs eager",
    "speedup_over_first.today": "today's recipe step (the reference)",
    "speedup_over_first.layer4.1": "step fine-tuning layer4's last two blocks vs today's whole layer4",
    "speedup_over_first.layer4.2": "step fine-tuning layer4's last block vs today's whole layer4",
    "cpu_speedup_over_first.today": "today's recipe step, CPU time (the reference)",
    "cpu_speedup_over_first.layer4.1": "layer4's last two blocks vs the whole layer4, CPU time",
    "cpu_speedup_over_first.layer4.2": "layer4's last block vs the whole layer4, CPU time",
}


def reading(record: dict, found: dict[str, float]) -> str:
    """One sentence that reads a benchmark's table."""
    if "speedup" in found and len(found) == 1:
        if found["speedup"] >= 1:
            return "Two processes train faster than one here: the work they share outweighs the all-reduce."
        return ("Two processes are slower than one here: on a 2-core machine a second process "
                "gains no compute and adds an all-reduce of every gradient at every step.")
    if len(found) == 1:
        (name, value), = found.items()
        return (f"One ratio: {NAMES.get(name, name)}, {value:g}×"
                + (" (below 1: slower)." if value < 1 else "."))
    best_name, best = max(found.items(), key=lambda kv: kv[1])
    below = [n for n, v in found.items() if v < 1]
    text = f"The largest factor is {NAMES.get(best_name, best_name)}: {best:g}×."
    if below:
        text += " Below 1 (slower, or a time ratio where smaller is better): " + \
            ", ".join(NAMES.get(n, n) for n in below) + "."
    return text


def attention_reading(record: dict) -> str:
    """What an attention-score table says: where chunks pay in fp32, why bf16 gains, and
    (records that time it) what computing the tanh from a sigmoid gains."""
    speedup = record["speedup_chunks_over_one_piece"]
    rows = max(case["rows"] for case in record["cases"])  # the beam search's
    size = (rows, record["shape"]["P"], record["shape"]["A"])
    tanh = record[f"tanh_ms_{rows}_rows"]

    def verdict(ratio: float) -> str:  # within 5 %: this machine's repeat-to-repeat noise
        return "gain" if ratio > 1.05 else "lose" if ratio < 0.95 else "neither gain nor lose"

    text = (f"In fp32 the chunks {verdict(speedup['fp32_beam'])} at beam-search size "
            f"({speedup['fp32_beam']:g}×; the one-piece sum, {math.prod(size) * 4 / 1e6:.1f} MB "
            "of fp32, is a fresh allocation larger than a core's L2 cache) and "
            f"{verdict(speedup['fp32_greedy'])} at greedy size ({speedup['fp32_greedy']:g}×). ")
    bf16 = f"For bf16 inputs they {verdict(speedup['bf16_beam'])} ({speedup['bf16_beam']:g}× and " \
           f"{speedup['bf16_greedy']:g}×)"
    if tanh["bfloat16"] > 1.05 * tanh["float32"]:
        text += (bf16 + ", most of it because the chunks compute the sum, the tanh and the "
                 f"product in fp32: on this CPU a bf16 tanh over the beam search's {size} took "
                 f"{tanh['bfloat16']:g} ms against {tanh['float32']:g} ms in fp32 "
                 f"(`tanh_ms_{rows}_rows`).")
    else:
        than = "faster than" if tanh["bfloat16"] < 0.95 * tanh["float32"] else "no slower than"
        text += (bf16 + f", although here a bf16 tanh over {size} was {than} an fp32 one "
                 f"({tanh['bfloat16']:g} ms against {tanh['float32']:g} ms, "
                 f"`tanh_ms_{rows}_rows`)" + (": the chunks replace the tanh (next sentence)."
                                              if "speedup_sigmoid_form" in record else "."))
    sigmoid = record.get(f"sigmoid_form_ms_{rows}_rows")
    if sigmoid is None:
        return text + " (This file was written before the chunks computed the tanh from a sigmoid.)"
    form = record["speedup_sigmoid_form"]
    return text + (" The chunks compute the tanh as 2σ(2x) − 1, its constants folded into the "
                   f"score's weights (`attention.sigmoid_form`): on this CPU the fp32 tanh over "
                   f"{size} took {tanh['float32']:g} ms and the doubling and sigmoid that "
                   f"replace it {sigmoid:g} ms, so the chunks ran {form['fp32_beam']:g}× (fp32) "
                   f"and {form['bf16_beam']:g}× (bf16) as fast as the same chunks with the tanh "
                   "at beam-search size (`speedup_sigmoid_form`).")


def ratios(record: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a benchmark record whose name says it is a ratio or a speed-up."""
    found = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if key in ("issue_goal", "ratio_of_gemm_peak", "step_product_ratio_of_gemm_peak"):
            continue  # goals and shares of the GEMM peak: the next table and its reading
        if isinstance(value, dict):
            found.update(ratios(value, f"{name}."))
        elif isinstance(value, (int, float)) and re.search(r"ratio|speedup|_over_", name):
            found[name] = value
    return found


folder = Path(BENCHMARKS)
if folder.is_dir():
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if path.name.startswith("recipe_") and "epochs" in record:
            continue  # a recipe experiment's curve: in the next section
        found = ratios(record)
        display(Markdown(f"**`{path.name}`**: {record.get('benchmark', path.stem)} "
                         f"(CPU threads: {record.get('threads', '?')})"))
        display(table(["what is compared", "ratio"],
                      [[NAMES.get(name, f"`{name}`"), f"{value:g}×"] for name, value in found.items()]))
        display(Markdown(reading(record, found)))
        if path.name.startswith("attention"):
            display(Markdown(attention_reading(record)))
else:
    print(f"{folder} is not here: the benchmark results live in the repository ({REPO_URL})")

# %% [markdown]
# ### Against the speed goals
#
# The figures the speed issue set goals for, as `make bench` ends by printing them
# (`benchmarks/summary.py`), next to the goal the benchmark file records, and how far
# each one is from it. One column per CPU the benchmarks have run on: the main files, and
# the same benchmarks written with `--out results/<name>__<cpu>.json` on another
# machine. Both sides of every ratio ran in one process on one machine, but the ratios
# themselves move from CPU to CPU (the tutorial-style code and the library's use the
# matrix units differently), so a goal can be reached on one and not on the other.

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
GOALS = [  # (file, key path, what, unit, goal key path)
    ("decoder.json", ("speedup_vs_tutorial_median", "variable"),
     "decoder training step vs tutorial-style (lengths 10-20, median)", "×", ("issue_goal", "speedup_vs_tutorial")),
    ("decoder.json", ("speedup_vs_tutorial_median", "fixed"),
     "decoder training step vs tutorial-style (all lengths 20, median)", "×", ("issue_goal", "speedup_vs_tutorial")),
    ("decoder.json", ("speedup_bf16_autocast_vs_tutorial_median", "variable"),
     "decoder training step in bf16 autocast vs tutorial-style in fp32 (lengths 10-20, median)", "×",
     ("issue_goal", "speedup_vs_tutorial")),
    ("decoder.json", ("ratio_of_gemm_peak", "variable/caption_lib"),
     "decoder training step, fp32: share of the fp32 GEMM peak", "%", ("issue_goal", "ratio_of_gemm_peak")),
    ("decoder.json", ("ratio_of_gemm_peak", "variable/caption_lib_bf16"),
     "decoder training step, bf16 autocast: share of the bf16 GEMM peak", "%", ("issue_goal", "ratio_of_gemm_peak")),
    ("beam.json", ("ratio_batched_over_tutorial",),
     "batched beam search vs tutorial-style per-image search", "×", ("issue_goal", "ratio_batched_over_tutorial")),
    ("beam.json", ("images_per_s", "batched"),
     "batched beam search, images/s", "", ("issue_goal", "images_per_s_batched")),
    ("beam.json", ("ratio_batched_no_greedy_over_tutorial",),
     ("batched beam search without the greedy guard (`keep_greedy=False`: the tutorial's "
      "algorithm exactly) vs tutorial-style per-image search"), "×",
     ("issue_goal", "ratio_batched_over_tutorial")),
    ("beam.json", ("images_per_s", "batched_no_greedy"),
     "batched beam search without the greedy guard, images/s", "",
     ("issue_goal", "images_per_s_batched")),
    ("beam.json", ("ratio_batched_bf16_over_tutorial",),
     "batched beam search in bf16 vs tutorial-style per-image search (fp32)", "×",
     ("issue_goal", "ratio_batched_over_tutorial")),
    ("beam.json", ("images_per_s", "batched_bf16"),
     "batched beam search in bf16, images/s", "", ("issue_goal", "images_per_s_batched")),
]


def lookup(record: dict, keys: tuple[str, ...]):
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def shown(value, unit: str) -> str:
    if value is None:
        return "not recorded"
    return f"{100 * value:.0f} %" if unit == "%" else f"{value:g}{unit}"


def machines(name: str) -> dict[str, dict]:
    """A goal's benchmark file and its runs on other CPUs (`decoder__<cpu>.json`, written
    with the benchmark's `--out`): tag ("" for the file itself) -> record."""
    stem = name.removesuffix(".json")
    paths = [folder / name] + sorted(folder.glob(f"{stem}__*.json"))
    return {p.stem.partition("__")[2]: json.loads(p.read_text()) for p in paths if p.is_file()}


def cpu_label(tag: str) -> str:
    """A column's heading: the CPU model the files of `tag` record, and their threads."""
    found = [m[tag] for m in runs.values() if tag in m]
    model = next((r["cpu"]["model"] for r in found if isinstance(r.get("cpu"), dict)), "CPU ?")
    threads = sorted({str(r.get("threads", "?")) for r in found})
    return f"{model}, {'/'.join(threads)} threads ({'`*__' + tag + '.json`' if tag else 'main files'})"


runs = {name: machines(name) for name in dict.fromkeys(goal[0] for goal in GOALS)}
records = {name: by_tag.get("", {}) for name, by_tag in runs.items()}  # the main files
tags = list(dict.fromkeys(tag for by_tag in runs.values() for tag in by_tag))
goal_rows, short = [], {tag: [] for tag in tags}
for name, keys, what, unit, goal_keys in GOALS:
    goal = lookup(records[name] or next(iter(runs[name].values()), {}), goal_keys)
    cells = []
    for tag in tags:
        value = lookup(runs[name].get(tag, {}), keys)
        reached = "" if value is None or goal is None else (" (yes)" if value >= goal else " (no)")
        cells.append(shown(value, unit) + reached)
        if reached == " (no)":
            short[tag].append(f"{what} ({shown(value, unit)} of {shown(goal, unit)})")
    goal_rows.append([what, shown(goal, unit), *cells, name])
display(table(["figure", "goal", *(cpu_label(tag) for tag in tags), "file"], goal_rows))
for tag in tags:
    display(Markdown(f"On {cpu_label(tag)}: " + ("not reached: " + "; ".join(short[tag]) + "."
                                                 if short[tag] else
                                                 "every goal with a recorded figure is reached.")))
if "ratio_no_greedy_over_batched" in records["beam.json"]:
    display(Markdown(
        "The rows without the greedy guard are `beam_search(..., keep_greedy=False)`, the "
        "tutorial's algorithm step for step (its captions "
        + ("equal" if records["beam.json"]["no_greedy_same_as_tutorial"] else "differ from")
        + " the tutorial-style search's here). By default `beam_search` also keeps the "
        "greedy caption in the running, so that its result never ranks below a finished "
        "greedy caption; once the greedy prefix has left the beams, its row rides along "
        "with the beams' rows in every decoder step. On the benchmark's random decoder the "
        "search without it is "
        + " and ".join(f"{r['ratio_no_greedy_over_batched']}× as fast on {r['cpu']['model']}"
                       for r in runs["beam.json"].values()
                       if "ratio_no_greedy_over_batched" in r and "cpu" in r)
        + "; what the guard "
        "costs depends on how soon the greedy prefix leaves the beams."))
if "bf16_same_captions" in records["beam.json"]:
    display(Markdown(
        "The bf16 rows are `beam_search(..., precision=\"bf16\")`: a bfloat16 copy of the "
        "decoder runs the steps; log-probabilities, scores and the attention's scores stay "
        "fp32. Its captions are not "
        "the fp32 ones word for word: on the benchmark's untrained, random decoder "
        f"{records['beam.json']['bf16_same_captions']} captions agree with the fp32 search. "
        "What that costs a trained model is measured in chapter 6's bf16 comparison; the "
        "library's default stays fp32."))


def needed_share(record: dict, gflop: float, baseline_seconds: float, factor: float) -> str:
    """The share of the fp32 GEMM peak a step of `gflop` would need to take
    baseline_seconds / factor."""
    peak = record.get("gemm_2048_gflops_median")
    peak = peak.get("fp32") if isinstance(peak, dict) else peak
    return "not recorded" if not peak else f"{100 * gflop * factor / baseline_seconds / peak:.0f} %"


def demands(beam_record: dict, decoder_record: dict) -> str:
    """What the goals ask of the CPU the two records ran on, in shares of its fp32 peak."""
    batch = beam_record["sizes"]["images"]
    tutorial_s = batch / beam_record["images_per_s"]["tutorial"]  # seconds per batch
    beam_gflop = beam_record["gflop_per_batch"]["batched"]
    step_gflop = decoder_record["gflop_per_step"]["variable/caption_lib"]
    tutorial_step_s = decoder_record["ms_per_step_median"]["variable/tutorial"] / 1000
    cpu = beam_record.get("cpu", {})
    product = (f" One product of a training step's shape alone ran at "
               f"{100 * decoder_record['step_product_ratio_of_gemm_peak']:.0f} % of the square "
               "product's rate." if "step_product_ratio_of_gemm_peak" in decoder_record else "")
    if "images_per_s_at_step_product_rate" in beam_record:
        rows = batch * beam_record["sizes"]["beam_size"]
        product += (f" One product of a search step's shape ({rows} beam rows) alone ran at "
                    f"{100 * beam_record['step_product_ratio_of_gemm_peak']:.0f} % of it: if "
                    f"every product of the search ran at that rate and nothing else took "
                    f"time, the batched search would caption "
                    f"{beam_record['images_per_s_at_step_product_rate']:g} images/s.")
    return (f"On {cpu.get('model', 'an unrecorded CPU')}: 10× the tutorial-style beam search "
            f"would need {needed_share(beam_record, beam_gflop, tutorial_s, 10)} of the fp32 "
            f"GEMM peak, 100 images/s {needed_share(beam_record, beam_gflop, batch / 100, 1)} "
            f"(the batched search reached "
            f"{100 * beam_record['ratio_of_gemm_peak']['batched']:.0f} %, the tutorial-style "
            f"one {100 * beam_record['ratio_of_gemm_peak']['tutorial']:.0f} %), and 3× the "
            f"tutorial-style decoder step "
            f"{needed_share(decoder_record, step_gflop, tutorial_step_s, 3)} (the step reached "
            f"{100 * decoder_record['ratio_of_gemm_peak']['variable/caption_lib']:.0f} %)."
            + product)


beam_record, decoder_record = records["beam.json"], records["decoder.json"]
if beam_record and decoder_record:
    batch = beam_record["sizes"]["images"]
    rows_per_step = (decoder_record["sizes"]["batch"], batch * beam_record["sizes"]["beam_size"])
    beam_gflop = beam_record["gflop_per_batch"]["batched"]
    step_gflop = decoder_record["gflop_per_step"]["variable/caption_lib"]
    display(Markdown(
        f"What the goals ask of the machine, from the FLOPs the benchmarks count: the batched "
        f"beam search does {beam_gflop:g} GFLOP per batch of {batch} images, the tutorial-style "
        f"search {beam_record['gflop_per_batch']['tutorial'] / beam_gflop:.1f}× as many (it "
        f"recomputes the attention projection at every step, for one image at a time); the "
        f"decoder step does {step_gflop:g} GFLOP. Below, for each CPU, the share of its fp32 "
        f"GEMM peak each goal would need at these FLOP counts, and the share reached: a goal "
        f"that needs more than its search or step reaches is not met. Raising the share means "
        f"bigger products per step, and a step's products have only one batch of rows "
        f"({rows_per_step[0]} captions, or {rows_per_step[1]} beams): the recurrence must "
        f"finish step t before step t + 1 can start, and as the running captions end the later "
        f"steps have fewer rows; the elementwise work between the products counts no FLOPs."))
    for tag in tags:
        if tag in runs["beam.json"] and tag in runs["decoder.json"]:
            display(Markdown(demands(runs["beam.json"][tag], runs["decoder.json"][tag])))


def stage_reading(record: dict) -> str:
    """What `bench_train.py` says limits the default run: the fine-tuned stage's share of
    the recipe's step and of the bf16 GEMM peak ("" for files written before it measured
    the stage)."""
    if "stage_share_of_bf16_gemm_peak" not in record:
        return ""
    step = record["ms_per_step_median"]["bf16"]
    return (f"On {record['cpu']['model']}, the default run's training step (the recipe's "
            f"precision, {record['batch_captions']} captions) took {step:g} ms; the fine-tuned "
            f"stage's forward and backward alone took {record['stage_ms_median']:g} ms, "
            f"{100 * record['stage_share_of_recipe_step']:.0f} % of it, for "
            f"{record['stage_gflop']:g} GFLOP: "
            f"{100 * record['stage_share_of_bf16_gemm_peak']:.0f} % of the bf16 GEMM peak "
            f"measured beside it. A fine-tuning epoch of the default run is mostly that stage's work, "
            f"done at about the rate the machine's matrix products allow; a shorter run has to "
            f"do less of it (fewer epochs, fewer blocks fine-tuned, or epochs that train the "
            f"decoder alone once the stage stops: `encoder_epochs`), which is what the recipe "
            f"experiments below weigh against the F1 it costs.")


for record in machines("train.json").values():
    if text := stage_reading(record):
        display(Markdown(text))

# %% [markdown]
# ## Recipe experiments: what the offline recipe's settings rest on
#
# `benchmarks/recipe_experiments.py` trains variants of `recipe("shapes")` from the same
# seed and writes one curve per variant (`benchmarks/results/recipe_<name>.json`):
# validation semantic F1 after each epoch (on the whole validation split where the
# experiment measured it, otherwise the trainer's own validation images), attention
# grounding where measured, and the seconds an epoch took on the machine that ran it (a
# shared machine's seconds are contended; "CPU seconds" is the process's own CPU time).
# Below, per variant, what it changes, its curve, and a sentence that reads it. Curves
# measured since the recipe averages its weights (`TrainConfig.ema_decay`) are scores of
# the averaged weights; the older ones, flagged `had {'ema_decay': 0.0, ...}`, of the
# weights the run trained. Some curves (`ema`, `ema-short`, `batch-16`) are each one run
# evaluated more than once after every epoch: as its trainer validated it (the first
# columns) and with further exponential moving averages of its weights, one column per
# decay.

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
def f1_of(e: dict) -> float:
    """An epoch's validation F1: on the whole split where measured, else the trainer's."""
    return e.get("val_semantic_f1_all", e.get("val_semantic_f1"))


def averaged(record: dict) -> list[str]:
    """The decays of the weight averages a curve also evaluated ("ema" variants)."""
    return list(record["epochs"][0].get("ema", {}))


def curve_rows(record: dict) -> list[list]:
    """One row per epoch: F1 (whole val split where measured, else the trainer's), grounding,
    seconds and CPU seconds (blank where not recorded), then F1 / grounding of each weight
    average the curve evaluated."""
    rows = []
    for e in record["epochs"]:
        rows.append([e["epoch"], f"{f1_of(e):.3f}",
                     f"{e['val_grounding_mass']:.3f}" if "val_grounding_mass" in e else "",
                     e.get("seconds", ""), e.get("cpu_seconds", "")]
                    + [f"{e['ema'][d]['val_semantic_f1_all']:.3f} / "
                       f"{e['ema'][d]['val_grounding_mass']:.3f}" for d in averaged(record)])
    return rows


def curve_reading(record: dict) -> str:
    """One sentence: the best F1 of the curve, at which epoch, and after how many seconds."""
    f1 = [f1_of(e) for e in record["epochs"]]
    best = max(range(len(f1)), key=f1.__getitem__)
    seconds = sum(e.get("seconds", 0) for e in record["epochs"][:best + 1])
    text = (f"Best validation F1 {f1[best]:.3f} at epoch {best + 1} of {len(f1)}, "
            f"after {seconds:.0f} s of epochs")
    cpu = [e["cpu_seconds"] for e in record["epochs"][:best + 1] if "cpu_seconds" in e]
    if len(cpu) == best + 1:
        text += f" ({sum(cpu):.0f} CPU seconds)"
    for d in averaged(record):
        mean = [e["ema"][d]["val_semantic_f1_all"] for e in record["epochs"]]
        top = max(range(len(mean)), key=mean.__getitem__)
        text += (f"; its weights averaged with decay {d}: best F1 {mean[top]:.3f} at epoch "
                 f"{top + 1}, {mean[-1] - f1[-1]:+.3f} over the run's own at the last epoch")
    return text + "." + (f" {record['note']}" if "note" in record else "")


def cpu_of(record: dict) -> str:
    """The CPU a curve was measured on ("not recorded" for curves written before the
    experiment recorded it: those are compared with one another, as before)."""
    machine = record.get("machine", {})
    if "cpu_model" not in machine:
        return "not recorded"
    units = ", ".join(machine.get("cpu_flags", []))
    return machine["cpu_model"] + (f" ({units})" if units else "")


shapes_today = {k: v for part in recipe("shapes") for k, v in dataclasses.asdict(part).items()}


def settings_of(record: dict) -> dict:
    """Every setting a curve was trained with, model and training in one dict (settings
    added to the library since it was measured at their defaults, `ADDED_DEFAULTS`)."""
    return {**ADDED_DEFAULTS, **record["settings"]["model"], **record["settings"]["train"]}


def base_changes(record: dict, changes: dict, today: dict = shapes_today) -> dict:
    """The settings in which the recipe a curve started from differs from `today`
    (`recipe("shapes")`), besides the variant's own changes and the number of epochs:
    the recipe has changed since some curves were measured."""
    then = settings_of(record)
    own = ("epochs", "encoder_weights") + (("fine_tune",) if "starts_from" in record else ())
    return {k: v for k, v in then.items()
            if k in today and k not in changes and k not in own and v != today[k]}


experiments = sorted(folder.glob("recipe_*.json")) if folder.is_dir() else []
curves = {path.name: json.loads(path.read_text()) for path in experiments}  # read once
for file_name, record in curves.items():
    if "epochs" not in record or not record["epochs"]:
        continue
    changes = {**record["settings"]["changes"]["model"], **record["settings"]["changes"]["train"]}
    then = base_changes(record, changes)
    display(Markdown(f"**`{file_name}`**: changes {changes or 'none (the recipe as it was)'}"
                     + (f"; the recipe it started from had {then} (today's differs)" if then
                        else "")
                     + f"; CPU: {cpu_of(record)}"
                     + (f"; {record['source']}" if "source" in record else "")
                     + (f"; starts from {record['starts_from']}" if "starts_from" in record
                        else "")))
    display(table(["epoch", "val semantic F1", "val grounding (mass)", "seconds",
                   "CPU seconds"] + [f"averaged, d = {d}: F1 / grounding"
                                     for d in averaged(record)], curve_rows(record)))
    display(Markdown(curve_reading(record)))

# %% [markdown]
# ### How much the seed alone moves a curve
#
# Every curve above is one run from one seed. Where the same settings were also trained
# from other training seeds (`seed-1`, `seed-2`: another decoder initialisation, data order
# and dropout; the same random encoder and feature cache), the curves side by side show
# how far a curve moves for no reason but the seed: a difference between two variants
# smaller than this is not evidence that one learns faster. "Spread" is the highest
# minus the lowest of the seeds after the same epoch.

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
def seed_of(name: str) -> int:
    """The training seed of the curve in file `name`."""
    return curves[name]["settings"]["train"]["seed"]


def seed_groups(curves: dict) -> list[list[str]]:
    """Curves whose settings differ in the training seed alone (and the epochs asked
    for), two or more seeds per group, each group ordered by seed."""
    groups: dict[str, list[str]] = {}
    for name, record in curves.items():
        if not record.get("epochs") or "starts_from" in record:
            continue
        key = json.dumps({k: v for k, v in settings_of(record).items()
                          if k not in ("seed", "epochs")}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(name)
    return [sorted(g, key=seed_of) for g in groups.values() if len({seed_of(n) for n in g}) > 1]


def spread(values: list[float]) -> float:
    return max(values) - min(values)


seed_spread = []  # (files, largest F1 spread, largest grounding spread) per group
for group in seed_groups(curves):
    seeds = [seed_of(n) for n in group]
    epochs = list(zip(*(curves[n]["epochs"] for n in group)))  # the epochs all seeds have
    f1 = [[f1_of(e) for e in row] for row in epochs]
    ground = [[e["val_grounding_mass"] for e in row] for row in epochs]
    display(Markdown(", ".join(f"**`{n}`** (seed {s})" for n, s in zip(group, seeds))
                     + ": validation F1 and grounding (mass) after each epoch"))
    display(table(["epoch", *(f"F1, seed {s}" for s in seeds), "F1 spread",
                   *(f"grounding, seed {s}" for s in seeds), "grounding spread"],
                  [[row[0]["epoch"], *(f"{v:.3f}" for v in f), f"{spread(f):.3f}",
                    *(f"{v:.3f}" for v in g), f"{spread(g):.3f}"]
                   for row, f, g in zip(epochs, f1, ground)]))
    f1_gap, ground_gap = max(map(spread, f1)), max(map(spread, ground))
    seed_spread.append((group, f1_gap, ground_gap))
    display(Markdown(
        f"Across {len(seeds)} seeds the F1 after the same epoch spread by up to {f1_gap:.3f} "
        f"and the grounding by up to {ground_gap:.3f}; after epoch {len(epochs)} F1 ran from "
        f"{min(f1[-1]):.3f} to {max(f1[-1]):.3f} and grounding from {min(ground[-1]):.3f} to "
        f"{max(ground[-1]):.3f}."
        + (" The grounding moves more with the seed than F1 does." if ground_gap > f1_gap
           else "")))
if not seed_spread:
    display(Markdown("No curves here differ in the seed alone."))

# %% [markdown]
# The variants differ in what an epoch costs, so the fair comparison is at equal CPU time.
# The tables below give, for a few CPU budgets, the validation F1 of each variant's last
# epoch that ended within the budget (curves with CPU seconds recorded; blank where the
# curve had not reached the budget or stopped before it), one table per CPU the curves
# were measured on: a CPU second of one machine is not one of another. A curve that
# starts from a finished run (`decoder-on-today`) is left out: the run's own seconds are
# not in it. An `ema` curve gets one more row per weight average ("averaged d = ..."):
# the same epochs and seconds, scored with the average.

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
def f1_within(record: dict, budget: float) -> str:
    """F1 after the last epoch whose cumulative CPU seconds are within `budget` ("" if the
    curve ends before the budget is spent or has no CPU seconds)."""
    spent, value = 0.0, ""
    for e in record["epochs"]:
        if "cpu_seconds" not in e:
            return ""
        spent += e["cpu_seconds"]
        if spent > budget:
            return value
        value = f"{f1_of(e):.3f}"
    return ""  # the curve stopped before the budget was spent


def budget_reading(timed: list, budgets: list) -> str:
    """Which variant leads at each budget, and by how much over the next one."""
    parts = []
    for b in budgets:
        scores = sorted(((float(v), n) for n, r in timed if (v := f1_within(r, b))), reverse=True)
        if len(scores) >= 2:
            parts.append(f"within {b} CPU s, `{scores[0][1]}` leads with {scores[0][0]:.3f}, "
                         f"{scores[0][0] - scores[1][0]:+.3f} over `{scores[1][1]}`")
    if not parts:
        return "Too few curves with CPU seconds to compare."
    by_seed = (f" (the recipe's F1 spread by up to {max(g[1] for g in seed_spread):.3f} across "
               "seeds after the same epoch, above)" if seed_spread else "")
    return ("At equal CPU time: " + "; ".join(parts) + ". Each curve is one run from one "
            f"seed, so a lead smaller than what the seed alone moves a curve{by_seed} is not "
            "evidence that one variant learns faster.")


def averaged_curve(record: dict, decay: str) -> dict:
    """The same epochs, with the F1 of the weight average of `decay` as the curve's F1."""
    return {**record, "epochs": [{**e, "val_semantic_f1_all": e["ema"][decay]["val_semantic_f1_all"]}
                                 for e in record["epochs"]]}


budgets = [300, 600, 900, 1200]
timed = [(n, r) for n, r in curves.items() if r.get("epochs") and "cpu_seconds" in r["epochs"][0]
         and "starts_from" not in r]  # a curve that starts from a finished run is not a recipe
timed += [(f"{n}, averaged d = {d}", averaged_curve(r, d)) for n, r in list(timed)
          for d in averaged(r)]  # their updates are inside the run's seconds
for cpu in sorted({cpu_of(r) for _, r in timed}):
    same = [(n, r) for n, r in timed if cpu_of(r) == cpu]
    display(Markdown(f"CPU: {cpu}"))
    display(table(["variant"] + [f"F1 within {b} CPU s" for b in budgets],
                  [[f"`{n}`"] + [f1_within(r, b) for b in budgets] for n, r in same]))
    display(Markdown(budget_reading(same, budgets)))

# %% [markdown]
# ## Sizes of this build's workspace (for the Running-on-Colab page)
#
# What the offline run keeps in its workspace (`CAPTION_LIB_HOME`), measured on disk
# when this page is built and pasted into the page *Running on Colab* (`glue`): the data
# set, the feature cache of every chapter, and the default run's folder.

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
from myst_nb import glue


def disk_bytes(path: Path) -> int:
    """Bytes the files under `path` occupy (as `du` counts them: allocated blocks)."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_blocks * 512 for f in files)


workspace = Path(data_dir).parent
sizes = {"ws_data_mb": ("the data set folder (MB)", Path(data_dir), 1e6),
         "ws_features_gb": ("`features/`, every cached encoder output (GB)", workspace / "features", 1e9),
         "ws_run_mb": ("the default run's folder, `last.pt` and `best.pt` (MB)", run.out_dir, 1e6),
         "ws_checkpoint_mb": ("one checkpoint of the default run (MB)", run.out_dir / "best.pt", 1e6)}
rows = []
for key, (what, path, unit) in sizes.items():
    value = f"{disk_bytes(path) / unit:.1f}" if path.exists() else "n/a"
    glue(key, value, display=False)
    rows.append([what, value])
display(table(["in the workspace", "size"], rows))

# %% [markdown]
# ## Figures for the Scaling-up page
#
# The page *Scaling up* (Going further) plans a COCO run from the benchmark files above.
# Its figures are computed here, from those files and from the model's own sizes, and
# pasted into that page (MyST-NB `glue`), so that they change when the files do.

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
from myst_nb import glue

from caption_lib import DecoderWithAttention

COCO_IMAGES, COCO_TRAIN_CAPTIONS = 123_287, 113_287 * 5  # Karpathy's split, 5 captions each
coco_epochs = recipe("coco")[1].epochs
coco_decoder = DecoderWithAttention(10_000, encoder_dim=2048, embed_dim=512, decoder_dim=512,
                                    attention_dim=512)
n_params = sum(p.numel() for p in coco_decoder.parameters())
scaling = {  # glue key: (what it is, value)
    "coco_params_m": ("decoder parameters at COCO sizes (millions)", f"{n_params / 1e6:.1f}"),
    "coco_grad_mb": ("their fp32 gradients, all-reduced every step (MB)", f"{n_params * 4 / 1e6:.0f}"),
    "coco_cache_gb": ("feature cache, 2048×7×7 fp16 for all images (GB)",
                      f"{COCO_IMAGES * 2048 * 49 * 2 / 1e9:.1f}"),
    "coco_cache_layer3_gb": ("feature cache, 1024×14×14 fp16 `layer3` maps (GB)",
                             f"{COCO_IMAGES * 1024 * 14 * 14 * 2 / 1e9:.1f}"),
    "coco_epochs": ("epochs of the coco recipe", str(coco_epochs)),
}
encoder_file = folder / "encoder.json"
if encoder_file.is_file():
    record = json.loads(encoder_file.read_text())
    speed = record.get("extract_library_images_per_s",  # what cached_features runs
                       record["extract_bf16_channels_last_images_per_s"])
    scaling["extract_img_s"] = ("feature extraction as the cache runs it, images/s (encoder.json)",
                                f"{speed:g}")
    scaling["extract_coco_min"] = ("extracting all COCO images at that speed (minutes)",
                                   f"{COCO_IMAGES / speed / 60:.0f}")
for batch in (8, 32):
    ddp_file = folder / f"ddp_cpu_b{batch}.json"
    if not ddp_file.is_file():
        continue
    ddp = json.loads(ddp_file.read_text())
    for procs in ("1", "2"):
        rate = ddp["captions_per_s"][procs]
        hours = COCO_TRAIN_CAPTIONS / rate / 3600
        scaling |= {
            f"ddp{batch}_s{procs}": (f"batch {batch}, {procs} process(es): seconds per step",
                                     f"{ddp['seconds_per_step_median'][procs]:.2f}"),
            f"ddp{batch}_c{procs}": (f"batch {batch}, {procs} process(es): captions/s", f"{rate:g}"),
            f"ddp{batch}_epoch_h{procs}": ("a COCO epoch at that rate (hours)", f"{hours:.1f}"),
            f"ddp{batch}_run_h{procs}": (f"{coco_epochs} COCO epochs at that rate (hours)",
                                         f"{hours * coco_epochs:.0f}"),
        }
    scaling[f"ddp{batch}_speedup"] = (f"batch {batch}: speed-up of 2 processes over 1",
                                      f"{ddp['speedup']:g}")
    scaling[f"ddp{batch}_load"] = (f"batch {batch}: highest 1-minute load average during the runs",
                                   f"{max(ddp['load_average_1min']):.0f}")
for key, (_, value) in scaling.items():
    glue(key, value, display=False)
display(table(["figure", "value"], [[what, value] for what, value in scaling.values()]))

# %% [markdown]
# The table is the arithmetic behind that page's plan: sizes follow from the image count
# and the cached map's shape, times from the measured rates. The last rows are why the
# page recommends GPUs: at the CPU's measured rate a single COCO epoch takes hours.

# %% [markdown]
# ## Hard against soft attention: the cost of a training step
#
# `benchmarks/bench_hard.py` times one decoder training step (loss, backward, clipping,
# Adam) on cached features at the Colab recipe's sizes, for soft attention, for hard
# attention as the Hard attention chapter trains it (the expected context for half of
# the captions), and for hard attention with a drawn location for every caption.

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
hard_bench = Path(BENCHMARKS) / "hard.json"
if hard_bench.is_file():
    record = json.loads(hard_bench.read_text())
    ms = record["ms_per_step_median"]
    cpu = record.get("cpu_ms_per_step_median", {})  # CPU time: steadier on a shared machine
    display(table(["attention", "ms per step (median)", "relative to soft", "CPU ms per step",
                   "CPU, relative to soft"],
                  [[name, value, f"{value / ms['soft']:.2f}×", cpu.get(name, "n/a"),
                    f"{cpu[name] / cpu['soft']:.2f}×" if name in cpu else "n/a"]
                   for name, value in ms.items()]))
    sizes = record["sizes"]
    print(f"{sizes['captions']} captions, decoder {sizes['decoder_dim']}, vocabulary "
          f"{sizes['vocab']}, {record['device']} with {record['threads']} threads, "
          f"{record['repeats']} interleaved repeats; load average during the run "
          f"{record.get('load_average', 'not recorded')}")
    r = record.get("cpu_ratio_hard_over_soft", record["ratio_hard_over_soft"])
    reading = ("about as costly as" if abs(r - 1) < 0.1
               else "costlier than" if r > 1 else "cheaper than")
    print(f"Reading: a hard-attention step is {reading} a soft one on this machine ({r:.2f}× "
          "in CPU time). Both compute the attention weights at every step; hard attention "
          "adds the draws, the gather of one region per step and the log-probabilities the "
          "REINFORCE term needs, and saves the weighted sum over the 49 regions.")
else:
    print(f"{hard_bench} is not here: see the repository ({REPO_URL})")
