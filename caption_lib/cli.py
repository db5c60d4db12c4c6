"""The `caption-lib` command (also `python -m caption_lib`).

Each sub-command lives next to the code it drives and is registered here. A
`CaptionLibError` (bad input) prints one line `caption-lib: error: ...` and exits 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from caption_lib import __version__
from caption_lib.errors import CaptionLibError


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


def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Sub-commands contributed by the library's modules, in the book's order."""
    from caption_lib import caption, data, evaluate, shapes, train

    return [shapes.register, data.register, train.register, evaluate.register,
            caption.register]


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
