"""The ratios of the speed issue's table, read from benchmarks/results/ (`make bench` ends
with it): decoder training step and beam search against the tutorial-style formulation,
each one's share of the machine's GEMM peak, and the training step's bf16 speed-up.

Each line names the file it comes from and its CPU threads; a file or key that is not
there (a benchmark not run yet, or run before it recorded that figure) is said so, not
guessed. "Tutorial-style" is the algorithm of sgrvinod's PyTorch captioning tutorial,
written out in the benchmark (not its code).

    python benchmarks/summary.py [--results benchmarks/results] [--tag epyc]

`--tag T` reads the files a benchmark wrote with `--out results/<name>__T.json` on
another machine instead of the main ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# (file, path of keys, what it is, unit): "x" a ratio, "%" a share, other units as they are
ROWS = [
    ("decoder.json", ("speedup_vs_tutorial_median", "variable"),
     "decoder training step vs tutorial-style (lengths vary, median)", "x"),
    ("decoder.json", ("speedup_bf16_autocast_vs_tutorial_median", "variable"),
     "decoder training step in bf16 autocast vs tutorial-style in fp32 (median)", "x"),
    ("decoder.json", ("ratio_of_gemm_peak", "variable/caption_lib"),
     "decoder training step, fp32: share of the fp32 GEMM peak", "%"),
    ("decoder.json", ("ratio_of_gemm_peak", "variable/caption_lib_bf16"),
     "decoder training step, bf16 autocast: share of the bf16 GEMM peak", "%"),
    ("decoder.json", ("ms_per_step_median", "variable/caption_lib"),
     "decoder training step, fp32 (median)", "ms"),
    ("beam.json", ("ratio_batched_over_tutorial",),
     "batched beam search vs tutorial-style per-image search", "x"),
    ("beam.json", ("images_per_s", "batched"), "batched beam search", "img/s"),
    ("beam.json", ("ratio_of_gemm_peak", "batched"),
     "batched beam search: share of the fp32 GEMM peak", "%"),
    ("beam.json", ("images_per_s_at_step_product_rate",),
     "batched beam search's ceiling: all its FLOPs at the rate of one step's product alone",
     "img/s"),
    ("decoder.json", ("step_product_ratio_of_gemm_peak",),
     "one product of a decoder step's shape alone: share of the fp32 GEMM peak", "%"),
    ("beam.json", ("ratio_batched_no_greedy_over_tutorial",),
     "batched beam search, keep_greedy=False (the tutorial's algorithm) vs tutorial-style", "x"),
    ("beam.json", ("images_per_s", "batched_no_greedy"),
     "batched beam search, keep_greedy=False", "img/s"),
    ("beam.json", ("ratio_batched_bf16_over_tutorial",),
     "batched beam search in bf16 vs tutorial-style per-image search (fp32)", "x"),
    ("beam.json", ("images_per_s", "batched_bf16"), "batched beam search in bf16", "img/s"),
    ("beam.json", ("ratio_of_gemm_peak", "batched_bf16"),
     "batched beam search in bf16: share of the bf16 GEMM peak", "%"),
    ("train.json", ("speedup_recipe_bf16_over_fp32",),
     "recipe training step as the recipe runs it (stage and decoder in bf16 autocast) vs fp32",
     "x"),
    ("train.json", ("stage_share_of_bf16_gemm_peak",),
     "recipe training step's fine-tuned stage, forward + backward: share of the bf16 GEMM peak",
     "%"),
    ("compile_cpu.json", ("speedup_compiled_over_eager",),
     "fine-tuned layer4 step, torch.compile vs eager", "x"),
]


def lookup(record: dict, keys: tuple[str, ...]):
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def lines(results: Path = RESULTS, tag: str = "") -> list[str]:
    out = []
    for name, keys, what, unit in ROWS:
        if tag:
            name = f"{name.removesuffix('.json')}__{tag}.json"
        path = results / name
        if not path.is_file():
            out.append(f"{what}: {name} not found (run its benchmark)")
            continue
        record = json.loads(path.read_text())
        value = lookup(record, keys)
        where = f"{name}, {record.get('threads', '?')} threads"
        if value is None:
            out.append(f"{what}: not in {name} (written before it recorded {'.'.join(keys)})")
        elif unit == "x":
            out.append(f"{what}: {value:g}x ({where})")
        elif unit == "%":
            out.append(f"{what}: {100 * value:.0f} % ({where})")
        else:
            out.append(f"{what}: {value:g} {unit} ({where})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="read <name>__TAG.json (another machine's)")
    args = parser.parse_args(argv)
    print(f"== the issue's ratios ({args.results}{', files __' + args.tag if args.tag else ''})")
    for line in lines(args.results, args.tag):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
