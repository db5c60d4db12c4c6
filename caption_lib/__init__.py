"""caption_lib: "Show, Attend and Tell" (Xu et al. 2015), small enough to read.

The notebooks of the book explain this package; the tests pin it down. One concept per
module, in the order the book meets them:

    runtime   devices, seeds and the workspace folder (data, caches, runs)
    errors    the one exception type whose message is shown to users as one line
    cli       the `caption-lib` command
    vocab     tokenizer and Vocabulary (words <-> integers)
    annotations  caption files in three formats -> Records; safe image loading
    data      datasets, collate and `inspect` over Records
    shapes    the embedded synthetic data set
    encoder   ResNet-50 -> (B, 49, 2048) region features
    features  the feature cache of the encoder's frozen part
    download  Flickr8k for the Colab path (streamed, verified, resumable)
    attention additive (Bahdanau) soft attention over the 49 regions
    decoder   the attention LSTM decoder and the captioning loss
    hard_attention  stochastic hard attention (Sec. 4.1) and its REINFORCE estimator
    model     Captioner = vocabulary + encoder + decoder; safe checkpoints
    decoding  greedy decoding and batched beam search; caption one image
    metrics   BLEU, CIDEr, ROUGE-L, METEOR; semantic F1 and attention grounding
    viz       attention overlays, captioned image grids, training curves
    checks    friendly exercise checks (learner's code vs the reference)
"""

from caption_lib.attention import Attention
from caption_lib.caption import caption_files
from caption_lib.data import (
    CaptionDataset,
    FeatureCaptionDataset,
    ImageDataset,
    Record,
    collate_captions,
    find_missing_images,
    load_dataset,
    load_image,
    read_annotations,
    split_records,
    summarize,
)
from caption_lib.decoder import DecoderWithAttention, caption_loss
from caption_lib.decoding import DecodeResult, beam_search, caption_image, greedy_decode
from caption_lib.download import prepare_flickr8k
from caption_lib.encoder import EncoderCNN, image_transform
from caption_lib.errors import CaptionLibError
from caption_lib.metrics import bleu, coco_scores, grounding, semantic_f1
from caption_lib.model import Captioner, CaptionerConfig
from caption_lib.runtime import on_colab, pick_device, seed_everything, workspace_dir
from caption_lib.shapes import ensure_shapes, make_shapes, object_cell_mask, parse_mentions
from caption_lib.viz import plot_attention, plot_history, show_grid
from caption_lib.vocab import Vocabulary, tokenize

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "CaptionDataset",
    "CaptionLibError",
    "Captioner",
    "CaptionerConfig",
    "DecodeResult",
    "DecoderWithAttention",
    "EncoderCNN",
    "FeatureCaptionDataset",
    "ImageDataset",
    "Record",
    "Vocabulary",
    "beam_search",
    "bleu",
    "caption_files",
    "caption_image",
    "caption_loss",
    "coco_scores",
    "collate_captions",
    "ensure_shapes",
    "find_missing_images",
    "greedy_decode",
    "grounding",
    "image_transform",
    "load_dataset",
    "load_image",
    "make_shapes",
    "object_cell_mask",
    "on_colab",
    "parse_mentions",
    "pick_device",
    "plot_attention",
    "plot_history",
    "prepare_flickr8k",
    "read_annotations",
    "seed_everything",
    "semantic_f1",
    "show_grid",
    "split_records",
    "summarize",
    "tokenize",
    "workspace_dir",
]
