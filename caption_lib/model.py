"""The whole captioner: vocabulary + encoder + decoder, and a checkpoint format that is safe.

`Captioner` puts together what the previous chapters built: `Vocabulary` (words <->
integers), `EncoderCNN` (image -> (B, P, E) regions) and `DecoderWithAttention`
(Xu et al. 2015, "Show, Attend and Tell").

Checkpoints (`save` / `load`) never pickle modules or classes: the file is a plain dict of
strings, numbers and tensors that `torch.load(..., weights_only=True)` reads safely:

    format               "caption_lib.captioner/1"
    config               CaptionerConfig as a JSON string
    vocab                Vocabulary.to_dict() as a JSON string
    decoder              the decoder's state_dict
    encoder_trainable    state_dict of the encoder's trainable part only (the frozen part is
                         rebuilt from `encoder_weights_used` and checked by its fingerprint)
    encoder_frozen_batchnorm  only when training starts inside a stage ("layer4.2"): the
                         calibrated BatchNorm statistics of its frozen blocks
    encoder_weights_used e.g. "IMAGENET1K_V2" or "random(seed=0)"
    encoder_fingerprint  cheap checksum of the frozen encoder weights (float)
    checksum             sum of all stored tensor values (detects edited weights)
    extra                the caller's dict (epoch, optimizer state, history...)

Shapes: B batch, P regions (49), E encoder dim (2048), L caption length incl.
<start>/<end>, V vocabulary size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from caption_lib.decoder import DecoderWithAttention, caption_loss
from caption_lib.encoder import EncoderCNN
from caption_lib.errors import CaptionLibError
from caption_lib.hard_attention import TEST_CONTEXTS, HardAttentionDecoder, hard_attention_loss
from caption_lib.runtime import atomic_write, autocast
from caption_lib.vocab import Vocabulary

FORMAT = "caption_lib.captioner/1"
_KEYS = ("config", "vocab", "decoder", "encoder_trainable", "encoder_weights_used",
         "encoder_fingerprint", "checksum")


@dataclass
class CaptionerConfig:
    """Everything needed to rebuild a `Captioner` (stored in checkpoints as JSON).

    encoder_weights: "DEFAULT" (ImageNet when reachable), None (random init, seeded), or
        the path of a caption_lib checkpoint (ending in .pt): its encoder, every stage
        frozen (a new decoder on an encoder trained before, as the Hard attention chapter
        does with chapter 5's fine-tuned `layer4`).
    fine_tune: encoder stages that train (False, "layer4", "auto", ...; see `EncoderCNN`).
    grid: None (the network's 7x7 regions); any other grid is refused here, because the
        attention figures and the grounding metric assume the 7x7 grid of the book.
    alpha_c: weight of the doubly stochastic attention regulariser in the loss.
    deep_output: the paper's deep output layer (Eq. 7: L_o(E y_{t-1} + L_h h_t + L_z z_t),
        with a tanh and dropout before L_o; the book's recipes) or, False, one linear layer
        on h_t (most re-implementations; checkpoints written before the option).
    attention: "soft" (Sec. 4.2, the expected context) or "hard" (Sec. 4.1, one sampled
        region per word, trained with REINFORCE; see `caption_lib.hard_attention`).
    lambda_r, lambda_e: hard attention's weights of the REINFORCE and entropy terms.
    baseline_decay: the moving-average baseline's decay (the paper's 0.9).
    expected_prob: chance that a caption trains with the expected context (paper: 0.5).
    test_context: the context hard attention decodes with: "expected", "argmax", "sample".

    Checked when built (`CaptionLibError`, one line). `from_json` refuses unknown keys,
    except the retired ones in `RETIRED` (dropped: checkpoints that hold them still load).
    The maximum caption length is a decoding setting (`caption_lib.decoding.MAX_LEN`).
    """

    encoder_weights: str | None = "DEFAULT"
    fine_tune: bool | str | None = False
    init_seed: int = 0
    grid: int | None = None
    embed_dim: int = 512
    decoder_dim: int = 512
    attention_dim: int = 512
    dropout: float = 0.5
    alpha_c: float = 1.0
    deep_output: bool = False
    use_attention: bool = True
    attention: str = "soft"
    lambda_r: float = 1.0
    lambda_e: float = 0.01
    baseline_decay: float = 0.9
    expected_prob: float = 0.5
    test_context: str = "expected"

    RETIRED: ClassVar[dict] = {"max_len": 20}  # removed fields -> their last default

    def __post_init__(self) -> None:
        for name in ("embed_dim", "decoder_dim", "attention_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CaptionLibError(f"CaptionerConfig.{name}={getattr(self, name)!r}: "
                                      "must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise CaptionLibError(f"CaptionerConfig.dropout={self.dropout!r}: use 0 <= dropout < 1")
        if self.alpha_c < 0:
            raise CaptionLibError(f"CaptionerConfig.alpha_c={self.alpha_c!r}: must be >= 0")
        if not isinstance(self.deep_output, bool):
            raise CaptionLibError(f"CaptionerConfig.deep_output={self.deep_output!r}: "
                                  "use True or False")
        if self.grid not in (None, 7):
            raise CaptionLibError(f"CaptionerConfig.grid={self.grid!r}: only the 7x7 grid (None) "
                                  "is supported end to end (attention plots, grounding)")
        self._check_attention()
        if _is_checkpoint(self.encoder_weights) and self.fine_tune not in (False, None, "auto"):
            raise CaptionLibError(f"CaptionerConfig: fine_tune={self.fine_tune!r}: the encoder "
                                  f"of {self.encoder_weights} is used frozen (use False)")

    def _check_attention(self) -> None:
        """One clear line for a bad hard-attention setting."""
        def bad(what: str) -> CaptionLibError:
            return CaptionLibError(f"CaptionerConfig: {what}")

        if self.attention not in ("soft", "hard"):
            raise bad(f"attention={self.attention!r}: use 'soft' or 'hard'")
        if self.attention == "hard" and not self.use_attention:
            raise bad("attention='hard' needs use_attention=True")
        for name in ("lambda_r", "lambda_e"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise bad(f"{name}={value!r}: must be a finite number >= 0")
        if not (isinstance(self.baseline_decay, (int, float)) and 0 <= self.baseline_decay < 1):
            raise bad(f"baseline_decay={self.baseline_decay!r}: must be in [0, 1)")
        if not (isinstance(self.expected_prob, (int, float)) and 0 <= self.expected_prob <= 1):
            raise bad(f"expected_prob={self.expected_prob!r}: must be in [0, 1]")
        if self.test_context not in TEST_CONTEXTS:
            raise bad(f"test_context={self.test_context!r}: use one of {', '.join(TEST_CONTEXTS)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CaptionerConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("config is not a JSON object")
        return cls(**known_fields(cls, data))


def known_fields(cls: type, data: dict) -> dict:
    """`data` without `cls.RETIRED` keys; ValueError naming any other unknown key.

    The one rule for reading a config dataclass (`CaptionerConfig`, `TrainConfig`) back
    from a checkpoint: a field removed from the code is dropped, anything else unknown is
    an error (a typo or a file from a newer version)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - set(getattr(cls, "RETIRED", {})))
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    return {k: v for k, v in data.items() if k in known}


def _tensor_checksum(*state_dicts: dict[str, torch.Tensor]) -> float:
    """Sum of all values (in float64) of the tensors of `state_dicts`."""
    total = 0.0
    for state in state_dicts:
        for value in state.values():
            if torch.is_tensor(value):
                total += float(value.detach().double().sum())
    return total


class Captioner(nn.Module):
    """Vocabulary + `EncoderCNN` + `DecoderWithAttention`, built from a `CaptionerConfig`.

    Args:
        vocab: the vocabulary (its size fixes the decoder's output layer).
        config: dims, encoder choice, dropout, alpha_c...; defaults when None.
        encoder: an already built encoder to use instead of building one from `config`
            (e.g. to share one ResNet between models); it must match `config`.
    """

    def __init__(self, vocab: Vocabulary, config: CaptionerConfig | None = None,
                 encoder: EncoderCNN | None = None) -> None:
        super().__init__()
        self.vocab = vocab
        self.config = config = config or CaptionerConfig()
        self.encoder = encoder or build_encoder(config)
        dims = {"encoder_dim": self.encoder.encoder_dim, "embed_dim": config.embed_dim,
                "decoder_dim": config.decoder_dim, "attention_dim": config.attention_dim,
                "dropout": config.dropout, "use_attention": config.use_attention,
                "deep_output": config.deep_output}
        if config.attention == "hard":
            self.decoder = HardAttentionDecoder(len(vocab), expected_prob=config.expected_prob,
                                                test_context=config.test_context, **dims)
        else:
            self.decoder = DecoderWithAttention(len(vocab), **dims)
        self.extra: dict[str, Any] = {}  # what `load` found under "extra"

    # -- the model ------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) images -> (B, P, E) region features."""
        return self.encoder(images)  # (B, 49, 2048)

    def encode_cached(self, cached: torch.Tensor, precision: str = "auto",
                      encoder: EncoderCNN | None = None) -> torch.Tensor:
        """The encoder's frozen-part output (from the feature cache) -> (B, P, E) in fp32.

        `cached` (B, C, h, w), any dtype and device, goes to the model's device in fp32,
        except as below. A fine-tuned stage runs on channels_last input under
        `runtime.autocast` (bf16; `precision="fp32"`: none); when a whole stage is trained
        its input goes straight to the autocast dtype (`EncoderCNN.reads_cache_in_convolutions`: the values its
        convolutions would cast it to, without the fp32 copy and its two casts; on a 2-core
        AMD EPYC the recipe's layer4 forward and backward alone took about 30 ms less of
        about 500, within the noise of a whole step). `encoder`: the encoder whose frozen output
        `cached` is, when not the model's own (the trainer's copy of a stage it stopped
        training)."""
        encoder = encoder or self.encoder
        device = next(self.decoder.parameters()).device
        if not encoder.trained_stages:
            x = cached.to(device, torch.float32, non_blocking=True)  # (B, C, h, w)
            return encoder.forward_cached(x)  # (B, 49, 2048)
        amp = autocast(device, precision)
        dtype = (amp.fast_dtype if isinstance(amp, torch.autocast)
                 and encoder.reads_cache_in_convolutions else torch.float32)
        # one copy: to the dtype and channels_last at once
        x = cached.to(device, dtype, non_blocking=True,
                      memory_format=torch.channels_last)  # (B, C, h, w)
        with amp:
            return encoder.forward_cached(x).float()  # (B, 49, 2048)

    def forward(self, images: torch.Tensor, captions: torch.Tensor,
                lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and captions (B, L) -> logits (B, L-1, V), alphas (B, L-1, P)."""
        return self.decoder(self.encode(images), captions, lengths)

    def forward_cached(self, cached: torch.Tensor, captions: torch.Tensor,
                       lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `forward`, from cached frozen-encoder outputs instead of images."""
        return self.decoder(self.encode_cached(cached), captions, lengths)

    def loss(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
             weights: tuple[float, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of captions (N, L) on region features (N, P, E).

        Hard attention: the REINFORCE estimate of `caption_lib.hard_attention` (in train
        mode it also moves the baseline). Soft attention: the teacher-forced decoder pass,
        then `caption_loss` with this model's alpha_c:
        returns the scalar loss (with gradient) and its parts as floats ("xent" per real
        token, "reg" per caption, "tokens"). `weights` (per-token terms, per-caption
        terms) scale the two terms, which are means over this batch: data-parallel
        training passes each process's share of the global batch
        (`distributed.split_batch`); None (one process) is the plain loss.
        """
        config = self.config
        if config.attention == "hard":
            return hard_attention_loss(self.decoder, features, captions, lengths,
                                       lambda_r=config.lambda_r, lambda_e=config.lambda_e,
                                       alpha_c=config.alpha_c,
                                       baseline_decay=config.baseline_decay, weights=weights)
        logits, alphas = self.decoder(features, captions, lengths)  # (N, L-1, V), (N, L-1, P)
        logits, alphas = logits.float(), alphas.float()
        return caption_loss(logits, captions, lengths, alphas, alpha_c=self.config.alpha_c,
                            pad_id=self.vocab.pad_id, weights=weights)

    def cached_loss(self, cached: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                    owner: torch.Tensor | None = None, weights: tuple[float, float] | None = None,
                    precision: str = "auto", encoder: EncoderCNN | None = None,
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """`loss` from cached frozen outputs (B, C, h, w) of B images; `owner` (N,): the
        image of each caption (its row in `cached`; None: one caption per image). The
        encoder stage runs once per image and its captions share the result. `encoder`:
        as in `encode_cached`."""
        features = self.encode_cached(cached, precision, encoder)  # (B, P, E)
        if owner is not None:
            features = features.index_select(0, owner.to(features.device))  # (N, P, E)
        return self.loss(features, captions.to(features.device), lengths.to(features.device),
                         weights=weights)

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint atomically (`runtime.atomic_write`: temporary file, fsync, rename).

        `extra` may hold nested dicts/lists of tensors, numbers, strings, bools and None
        (an optimizer's state_dict, the epoch, the loss history).
        """
        path = Path(path)
        decoder_state = self.decoder.state_dict()
        encoder_state = self.encoder.trainable.state_dict()
        frozen_bn = self.encoder.frozen_batchnorm_state()  # {} unless calibrated
        payload = {
            "format": FORMAT,
            "config": self.config.to_json(),
            "vocab": json.dumps(self.vocab.to_dict(), ensure_ascii=False),
            "decoder": decoder_state,
            "encoder_trainable": encoder_state,
            "encoder_weights_used": self.encoder.weights_used,
            "encoder_fingerprint": self.encoder.frozen_fingerprint(),
            "checksum": _tensor_checksum(decoder_state, encoder_state, frozen_bn),
            "extra": dict(extra or {}),
        }
        if frozen_bn:
            payload["encoder_frozen_batchnorm"] = frozen_bn
        with atomic_write(path) as f:
            torch.save(payload, f)
        return path

    @classmethod
    def from_url(cls, url: str, sha256: str, map_location: str | torch.device = "cpu",
                 progress: bool = True) -> Captioner:
        """`load` a published checkpoint: downloaded once (resumable) into the workspace
        and checked against `sha256` first (`caption_lib.download.fetch_checkpoint`)."""
        from caption_lib.download import fetch_checkpoint

        return cls.load(fetch_checkpoint(url, sha256, progress=progress), map_location)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Captioner:
        """Rebuild a `Captioner` from `save`'s file; `.extra` holds the saved `extra`.

        Raises `CaptionLibError` (one line naming the file) when the file is missing, not
        a caption_lib checkpoint, damaged, or made with other frozen encoder weights.
        """
        path = Path(path)
        payload = read_checkpoint(path, map_location)

        def bad(what: str) -> CaptionLibError:
            return CaptionLibError(f"{path}: {what}")

        try:
            config = CaptionerConfig.from_json(payload["config"])
            vocab = Vocabulary.from_dict(json.loads(payload["vocab"]))
        except (ValueError, TypeError, CaptionLibError) as err:
            raise bad(f"damaged checkpoint: bad config or vocabulary ({_line(err)})") from None
        frozen_bn = payload.get("encoder_frozen_batchnorm") or {}
        stored = _tensor_checksum(payload["decoder"], payload["encoder_trainable"], frozen_bn)
        if not math.isclose(stored, payload["checksum"], rel_tol=1e-9, abs_tol=1e-6):
            raise bad("damaged checkpoint: the weights do not match their checksum")

        used = str(payload["encoder_weights_used"])
        # rebuild the frozen part exactly as it was: the same weights, or the same seed
        weights = None if used.startswith("random") else used
        try:
            if _is_checkpoint(config.encoder_weights):  # the encoder of another checkpoint
                encoder = build_encoder(config)
            else:
                encoder = EncoderCNN(weights=weights, fine_tune=config.fine_tune,
                                     grid=config.grid, strict=weights is not None,
                                     init_seed=config.init_seed)
        except CaptionLibError as err:
            raise bad(f"needs encoder weights {used}: {_line(err)}") from None
        if encoder.weights_used != used:
            raise bad(f"trained with encoder weights {used}, but {encoder.weights_used} "
                      "were built here")
        if frozen_bn:
            try:
                encoder.load_frozen_batchnorm_state(frozen_bn)
            except CaptionLibError as err:
                raise bad(f"damaged checkpoint: {_line(err)}") from None
        if not math.isclose(encoder.frozen_fingerprint(), payload["encoder_fingerprint"],
                            rel_tol=1e-6):
            raise bad(f"the frozen encoder weights ({used}) differ from those it was trained "
                      "with (fingerprint mismatch: another torchvision or seed?)")
        model = cls(vocab, config, encoder=encoder)
        try:
            model.decoder.load_state_dict(payload["decoder"])
            model.encoder.trainable.load_state_dict(payload["encoder_trainable"])
        except (RuntimeError, KeyError) as err:
            raise bad(f"damaged checkpoint: weights do not fit the stored config "
                      f"({_line(err)})") from None
        model.extra = payload.get("extra") or {}
        return model.to(map_location)


def _is_checkpoint(weights: object) -> bool:
    return isinstance(weights, str) and weights.endswith(".pt")


def build_encoder(config: CaptionerConfig) -> EncoderCNN:
    """The encoder `config` asks for: a ResNet-50 (ImageNet or seeded random init), or the
    encoder of the checkpoint `config.encoder_weights`, every stage frozen and named after
    that file and its weights (a changed file gives another name, hence another cache)."""
    if not _is_checkpoint(config.encoder_weights):
        return EncoderCNN(weights=config.encoder_weights, fine_tune=config.fine_tune,
                          grid=config.grid, init_seed=config.init_seed)
    path = Path(config.encoder_weights).resolve()
    encoder = Captioner.load(path).encoder  # CaptionLibError naming the file when bad
    if encoder.grid != config.grid:
        raise CaptionLibError(f"{path}: its encoder has grid {encoder.grid}, the config asks "
                              f"for {config.grid}")
    return freeze_named(encoder, str(path))


def freeze_named(encoder: EncoderCNN, source: str) -> EncoderCNN:
    """`encoder.freeze` (in place), named after its weights, its trained stages, `source`
    (where they were trained) and a checksum of the stages' weights and statistics. Its
    feature cache is keyed by the stages' content (a SHA-256 of their tensors), not by
    `source`: the same weights reached from two places (the stage a run froze after its
    `encoder_epochs`, and that run's `best.pt`) share one cache; other weights get
    another."""
    stages = "+".join(encoder.trained_stages) or "frozen"
    state = encoder.trainable.state_dict()
    checksum = _tensor_checksum(state)
    return encoder.freeze(f"{encoder.weights_used}+{stages} of {source} ({checksum:.10g})",
                          cache_name=f"{encoder.weights_used}+{stages} sha256:"
                                     f"{_tensor_digest(state)}")


def _tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of the tensors of `state`."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if torch.is_tensor(value):
            value = value.detach().cpu().contiguous()
            digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _line(err: BaseException, limit: int = 160) -> str:
    """The first line of an error message, shortened."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The raw checkpoint dict of `path`, checked to be ours (`CaptionLibError` if not)."""
    path = Path(path)
    if not path.is_file():
        raise CaptionLibError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises many types for foreign files)
        raise CaptionLibError(f"{path}: not a readable caption_lib checkpoint "
                              f"({type(err).__name__}: {_line(err)})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        kind = "a plain state_dict" if isinstance(payload, dict) else type(payload).__name__
        raise CaptionLibError(f"{path}: not a caption_lib checkpoint (no format marker; "
                              f"found {kind})")
    if not isinstance(payload["format"], str) or payload["format"] != FORMAT:
        raise CaptionLibError(f"{path}: checkpoint format {payload['format']!r} is not "
                              f"{FORMAT!r}")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise CaptionLibError(f"{path}: damaged checkpoint: missing {', '.join(missing)}")
    return payload
