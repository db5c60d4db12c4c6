"""caption_lib: "Show, Attend and Tell" (Xu et al. 2015), small enough to read.

The notebooks of the book explain this package; the tests pin it down. One concept per
module, in the order the book meets them:

    runtime   devices, seeds and the workspace folder (data, caches, runs)
    errors    the one exception type whose message is shown to users as one line
    cli       the `caption-lib` command
"""

from caption_lib.errors import CaptionLibError
from caption_lib.runtime import on_colab, pick_device, seed_everything, workspace_dir

__version__ = "0.1.0"

__all__ = [
    "CaptionLibError",
    "on_colab",
    "pick_device",
    "seed_everything",
    "workspace_dir",
]
