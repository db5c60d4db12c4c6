"""The `caption-lib` command (also `python -m caption_lib`): all argument parsing.

    caption-lib make-shapes OUT_DIR [--train N --val N --test N --seed S]
    caption-lib inspect ANNOTATIONS [--images DIR] [--json]
    caption-lib train --data DIR [--out RUN_DIR] [--epochs N] [--device auto|cpu|cuda] ...
    caption-lib evaluate CHECKPOINT [--data DIR] [--split test] [--beam-size K] [--precision bf16] [--json]
    caption-lib caption CHECKPOINT IMAGE... [--beam-size K] [--precision bf16] [--attention-plot OUT.png]

Each sub-command is a parser (`_add_*`) and a function that calls the library (`_cmd_*`);
the library modules themselves never see `argparse`. A `CaptionLibError` (bad input)
prints one line `caption-lib: error: ...` and exits 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from caption_lib import __version__
from caption_lib.decoding import MAX_LEN, PRECISIONS
from caption_lib.errors import CaptionLibError

Sub = argparse._SubParsersAction


def _cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the device `auto` picks and the workspace folder."""
    import torch
    import torchvision

    from caption_lib.runtime import pick_device, workspace_dir

    info = {
        "caption_lib": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(pick_device("auto")),
        "workspace": str(workspace_dir()),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:12s} {value}")
    return 0


# -- make-shapes ---------------------------------------------------------------------------

def _cmd_make_shapes(args: argparse.Namespace) -> int:
    from caption_lib.shapes import make_shapes

    start = time.perf_counter()
    out = make_shapes(args.out_dir, args.train, args.val, args.test, seed=args.seed,
                      image_size=args.image_size)
    n = args.train + args.val + args.test
    print(f"wrote {n} images to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _add_make_shapes(sub: Sub) -> None:
    p = sub.add_parser("make-shapes", help="generate the synthetic shapes data set")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    p.add_argument("--train", type=int, default=3000, metavar="N")
    p.add_argument("--val", type=int, default=300, metavar="N")
    p.add_argument("--test", type=int, default=300, metavar="N")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--image-size", type=int, default=224, metavar="PX")
    p.set_defaults(func=_cmd_make_shapes)


# -- inspect -------------------------------------------------------------------------------

def _cmd_inspect(args: argparse.Namespace) -> int:
    from caption_lib.data import load_dataset, summarize

    skipped: Counter = Counter()
    with warnings.catch_warnings():  # the skips are printed below
        warnings.simplefilter("ignore")
        records = load_dataset(args.annotations, args.images, skipped=skipped)
    info = summarize(records, min_freq=args.min_freq)
    info["skipped"] = dict(sorted(skipped.items()))
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.annotations}: {info['images']} images, {info['captions']} captions")
    print("splits       " + ", ".join(f"{k} {v}" for k, v in info["splits"].items()))
    print(f"vocabulary   {info['vocab_size']} words (train split, min_freq {args.min_freq})")
    lengths = info["caption_length"]
    print("caption len  " + ", ".join(f"{k} {v}" for k, v in lengths.items()) + " tokens")
    print(f"missing      {info['missing_images']} image files")
    print("skipped      " + (", ".join(f"{n} {k}" for k, n in info["skipped"].items()) or "none"))
    return 0


def _add_inspect(sub: Sub) -> None:
    p = sub.add_parser("inspect", help="counts, splits and vocabulary of a data set")
    p.add_argument("annotations", metavar="ANNOTATIONS", type=Path,
                   help="annotation file or data set folder")
    p.add_argument("--images", type=Path, metavar="DIR", help="folder of the image files")
    p.add_argument("--min-freq", type=int, default=1, metavar="N")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_inspect)


# -- train ---------------------------------------------------------------------------------

def _cmd_train(args: argparse.Namespace) -> int:
    from caption_lib import distributed
    from caption_lib.runtime import workspace_dir
    from caption_lib.train import recipe, train

    data = Path(args.data)
    if not data.exists():
        raise CaptionLibError(f"{data}: no such data folder (make one with `caption-lib make-shapes`)")
    name = args.recipe
    if name == "auto":
        name = ("shapes" if any(data.glob("dataset_shapes.json"))
                else "coco" if any(data.glob("dataset_coco.json")) else "flickr8k")
    model_config, config = recipe(name)
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "seed": args.seed, "restval": args.restval,
                 "encoder_epochs": args.encoder_epochs, "ema_decay": args.ema_decay,
                 "references": args.references, "precision": args.precision}
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    config.__post_init__()  # the overrides are checked as a built config is
    out = Path(args.out) if args.out else workspace_dir() / "runs" / data.name
    result = train(data, out, model_config, config, device=args.device, resume=args.resume,
                   progress=not args.no_progress)
    best = max(result.history, key=lambda h: h["val_bleu4"]) if result.history else None
    if best and distributed.is_main():  # data-parallel: rank 0 speaks
        print(f"best val BLEU-4 {best['val_bleu4']:.1f} at epoch {best['epoch']}; "
              f"checkpoints in {out}")
    return 0


def _add_train(sub: Sub) -> None:
    p = sub.add_parser("train", help="train a captioner (checkpoints: RUN_DIR/last.pt, best.pt); "
                       "runs data-parallel under torchrun --nproc_per_node=N")
    p.add_argument("--data", required=True, help="folder from make-shapes or a real data set")
    p.add_argument("--out", help="run folder (default: WORKSPACE/runs/DATA_NAME)")
    p.add_argument("--recipe", default="auto", choices=["auto", "shapes", "flickr8k", "coco"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="decoder learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--restval", choices=["train", "drop"],
                   help="COCO Karpathy split: fold the restval images into train (default) or drop them")
    p.add_argument("--encoder-epochs", type=int, metavar="N",
                   help="a fine-tuned encoder stage trains for the first N epochs only, the "
                        "decoder alone after them (0: every epoch; default: the recipe's, 7 "
                        "of 8 for shapes: with more --epochs, raise it too)")
    p.add_argument("--ema-decay", type=float, metavar="D",
                   help="validate and save an exponential moving average of the weights "
                        "with decay D per step (0: off; the shapes recipe's is 0.99)")
    p.add_argument("--references", choices=["random", "first"],
                   help="captions trained on: drawn at random each epoch, or each image's "
                        "first one only (the shapes recipe's: its canonical form)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="auto: the fine-tuned stage in bf16 autocast, the decoder too on "
                        "CUDA; bf16: the decoder's training steps on a CPU too (the shapes "
                        "recipe's); fp32: no autocast")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)


# -- evaluate ------------------------------------------------------------------------------

def _cmd_evaluate(args: argparse.Namespace) -> int:
    from caption_lib.evaluate import evaluate
    from caption_lib.model import Captioner
    from caption_lib.runtime import pick_device

    device = pick_device(args.device)
    model = Captioner.load(args.checkpoint, map_location=device)
    data = args.data or model.extra.get("data_dir")
    if not data:
        raise CaptionLibError(f"{args.checkpoint}: no data folder stored; pass --data")
    if not Path(data).exists():
        raise CaptionLibError(f"{data}: no such data folder")
    result = evaluate(model, data, split=args.split, beam_size=args.beam_size,
                      device=device, limit=args.limit, meteor=not args.no_meteor,
                      progress=not args.json, decode_precision=args.precision)
    if args.json:
        print(json.dumps(result.scores))
    else:
        for key, value in result.scores.items():
            text = f"{value:.2f}" if isinstance(value, float) else str(value)
            print(f"{key:12s} {text}")
    return 0


def _add_evaluate(sub: Sub) -> None:
    p = sub.add_parser("evaluate", help="decode a split and print BLEU/CIDEr/ROUGE-L/METEOR")
    p.add_argument("checkpoint", help="a .pt file written by `caption-lib train`")
    p.add_argument("--data", help="data folder (default: the one the model was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--limit", type=int, default=0, help="only the first N images")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    _add_precision(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_evaluate)


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="the search's arithmetic: bf16 is faster on CPUs with AVX512-BF16 "
                        "and may pick other words where two are nearly tied")


# -- caption -------------------------------------------------------------------------------

def _cmd_caption(args: argparse.Namespace) -> int:
    from caption_lib.caption import caption_files
    from caption_lib.model import Captioner
    from caption_lib.runtime import pick_device

    if args.beam_size < 1:
        raise CaptionLibError(f"--beam-size must be >= 1, got {args.beam_size}")
    if args.max_len < 1:
        raise CaptionLibError(f"--max-len must be >= 1, got {args.max_len}")
    device = pick_device(args.device)
    model = Captioner.load(args.checkpoint, map_location=device)
    results = caption_files(model, args.images, beam_size=args.beam_size, max_len=args.max_len,
                            device=device, attention_plot=args.attention_plot,
                            precision=args.precision)
    failed = [r for r in results if r.error is not None]
    for r in failed:
        print(f"caption-lib: error: {r.error}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "checkpoint": str(args.checkpoint), "beam_size": args.beam_size,
            "precision": args.precision,
            "captions": [{"image": r.image, "caption": " ".join(r.words), "plot": r.plot}
                         for r in results if r.error is None],
            "errors": [{"image": r.image, "error": r.error} for r in failed],
        }))
    else:
        for r in results:
            if r.error is None:
                print(f"{r.image}\t{' '.join(r.words)}")
    if failed:
        print(f"caption-lib: {len(failed)} of {len(results)} images failed", file=sys.stderr)
        return 2
    return 0


def _add_caption(sub: Sub) -> None:
    p = sub.add_parser("caption", help="caption image files with a trained checkpoint")
    p.add_argument("checkpoint", help="a .pt file written by `caption-lib train`")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any PIL format)")
    p.add_argument("--beam-size", type=int, default=3, help="beams per image (1: greedy)")
    p.add_argument("--max-len", type=int, default=MAX_LEN, help="at most this many words")
    p.add_argument("--attention-plot", metavar="OUT.png",
                   help="write the word-by-word attention figure (several images: "
                        "OUT-1.png, OUT-2.png, ... by argument position)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _add_precision(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_caption)


# -- the command ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caption-lib",
        description="Show, Attend and Tell: data, training, decoding and evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"caption-lib {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="versions, device and workspace folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)

    for register in _registrars():
        register(sub)
    return parser


def _registrars() -> list[Callable[[Sub], None]]:
    """The sub-commands, in the book's order."""
    return [_add_make_shapes, _add_inspect, _add_train, _add_evaluate, _add_caption]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CaptionLibError as err:
        if args.debug:
            raise
        print(f"caption-lib: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("caption-lib: interrupted", file=sys.stderr)
        return 130
