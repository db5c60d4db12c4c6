"""caption_lib: "Show, Attend and Tell" (Xu et al. 2015), small enough to read.

The notebooks of the book explain this package; the tests pin it down. One concept per
module, in three layers (a module only imports from its own layer or the ones above it):

    the paper's model (chapters 1-4, 6)
        vocab        tokenizer and Vocabulary (words <-> integers)
        annotations  caption files in three formats -> Records; safe image loading
        data         datasets, collate and `inspect` over Records
        shapes       the embedded synthetic data set
        encoder      ResNet-50 -> (B, 49, 2048) region features
        attention    additive (Bahdanau) soft attention over the 49 regions
        decoder      the attention LSTM decoder and the captioning loss
        recurrent    the LSTM update; one weight-gradient product for a loop's steps
        hard_attention  stochastic hard attention (Sec. 4.1) and its REINFORCE estimator
        model        Captioner = vocabulary + encoder + decoder: encode, loss; checkpoints
        decoding     greedy decoding and batched beam search; caption one image
        metrics      BLEU, CIDEr, ROUGE-L, METEOR; semantic F1 and attention grounding

    running it (chapter 5, the command line)
        runtime      devices, precision, seeds and RNG states, atomic writes, workspace
        features     the feature cache of the encoder's frozen part
        averaging    an exponential moving average of the weights (validated and saved)
        train        the training loop (`train_one_epoch`) and `train`, resume, recipes
        evaluate     decode a split and score it (validation and test: one loop)
        distributed  data-parallel helpers (torchrun, DDP): no-ops for one process
        download     Flickr8k for the Colab path (streamed, verified, resumable)
        caption      caption image files with a checkpoint
        cli          the `caption-lib` command: all argument parsing
        errors       the one exception type whose message is shown to users as one line

    teaching helpers (the notebooks)
        viz          attention overlays, captioned image grids, training curves
        checks       friendly exercise checks (learner's code vs the reference)

A flat package with this map, not sub-packages: every `caption_lib.X` import of the
notebooks, tests and the command line keeps working, and each module stays one file a
reader opens by its concept's name.
"""

from caption_lib.attention import Attention
from caption_lib.caption import caption_files
from caption_lib.data import (
    CaptionDataset,
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
from caption_lib.runtime import pick_device, seed_everything, workspace_dir
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
