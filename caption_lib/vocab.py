"""Words to integers and back: the tokenizer and the `Vocabulary`.

A caption becomes `<start> w1 ... wn <end>`, each word an index into the vocabulary
(`itos[i]` is the word of index i, `stoi[w]` the index of word w). Index 0 is `<pad>`, used
to fill shorter captions in a batch; words seen fewer than `min_freq` times in the
*training* captions map to `<unk>` (Xu et al. 2015 keep a fixed vocabulary the same way).

Tokenizing works offline: lower-case, nltk's `TreebankWordTokenizer` (pure regular
expressions, no downloaded data, unlike `word_tokenize`), and tokens without a letter or
digit (punctuation) are dropped, as in Karpathy's preprocessed splits.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from nltk.tokenize import TreebankWordTokenizer

from caption_lib.errors import CaptionLibError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_TOKENIZER = TreebankWordTokenizer()


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of `text`, punctuation dropped (a new list every call).

    >>> tokenize("A dog, running on the beach.")
    ['a', 'dog', 'running', 'on', 'the', 'beach']
    """
    return list(_tokens(text))


@functools.lru_cache(maxsize=1 << 16)
def _tokens(text: str) -> tuple[str, ...]:
    """`tokenize`, remembered: the treebank tokenizer's regular expressions take about
    0.1 ms a caption, and a process reads the same captions again for every run it loads
    (the shapes captions also repeat: 8,656 distinct among 18,000)."""
    return tuple(t for t in _TOKENIZER.tokenize(text.lower()) if any(ch.isalnum() for ch in t))


class Vocabulary:
    """A fixed word list with the four special tokens first (`<pad>` is 0)."""

    def __init__(self, words: Sequence[str] = (), min_freq: int = 1) -> None:
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise CaptionLibError("vocabulary: duplicate words")
        self.min_freq = min_freq
        self.pad_id, self.start_id, self.end_id, self.unk_id = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 1) -> Vocabulary:
        """Words seen >= `min_freq` times, most frequent first (ties alphabetical).

        Pass the training captions only: words of the validation and test captions must
        not leak into the vocabulary.
        """
        if min_freq < 1:
            raise CaptionLibError(f"vocabulary: min_freq must be >= 1, got {min_freq}")
        counts = Counter(t for c in captions for t in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_freq),
                       key=lambda w: (-counts[w], w))
        return cls(words, min_freq=min_freq)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words, min_freq={self.min_freq})"

    def encode(self, text: str | Sequence[str]) -> list[int]:
        """`<start> w1 ... wn <end>` as indices (L = n + 2); unknown words -> `<unk>`."""
        tokens = _tokens(text) if isinstance(text, str) else text
        return [self.start_id] + [self.stoi.get(t, self.unk_id) for t in tokens] + [self.end_id]

    def decode_tokens(self, ids: Iterable[int], strip: bool = True) -> list[str]:
        """Words of `ids` (the one ids -> words mapping of the library).

        `strip`: up to the first `<end>`, `<pad>` and `<start>` dropped (a reference
        caption). False: one word per id, none dropped (a decoded caption, whose words
        must stay aligned with its attention maps). Unknown ids become `<unk>`.
        """
        words = []
        for i in ids:
            i = int(i)
            if strip and i == self.end_id:
                break
            if strip and i in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return words

    def decode(self, ids: Iterable[int]) -> str:
        """The caption of `ids` as one string (see `decode_tokens`)."""
        return " ".join(self.decode_tokens(ids))

    def to_dict(self) -> dict:
        return {"itos": self.itos, "min_freq": self.min_freq}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        itos = d.get("itos") if isinstance(d, dict) else None
        if not isinstance(itos, list) or list(itos[:4]) != list(SPECIALS):
            raise CaptionLibError("vocabulary: 'itos' must be a list starting with "
                                  + " ".join(SPECIALS))
        return cls(itos[4:], min_freq=int(d.get("min_freq", 1)))

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (`runtime.atomic_write`)."""
        from caption_lib.runtime import atomic_write

        path = Path(path)
        with atomic_write(path) as f:
            f.write(json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CaptionLibError(f"{path}: vocabulary file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CaptionLibError(f"{path}: not a vocabulary JSON file ({err})") from None
        try:
            return cls.from_dict(d)
        except CaptionLibError as err:
            raise CaptionLibError(f"{path}: {err}") from None
