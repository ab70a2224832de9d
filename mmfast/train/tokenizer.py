"""An offline word-level tokenizer with a byte-level fallback.

The vocabulary is built from the training captions (the most frequent words, ties broken
alphabetically, so it is deterministic), saved as JSON in the run folder and in every checkpoint.
Ids: ``0 <pad>``, ``1 <bos>``, ``2 <eos>``, ``3 <unk>`` (unused, kept for compatibility), ``4..259``
one per byte value, then the words. A word that is not in the vocabulary is spelled with the byte
tokens of its UTF-8 encoding, so nothing is ever lost or mapped to ``<unk>``.

Text is lower-cased and split into runs of word characters and single punctuation characters.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = ["Tokenizer"]

_SPLIT = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_N_BYTES = 256


class Tokenizer:
    """Word-level tokenizer with byte fallback (module docstring)."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    byte_offset = len(_SPECIALS)

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        self.word_offset = self.byte_offset + _N_BYTES
        self.word_to_id = {w: self.word_offset + i for i, w in enumerate(self.words)}
        if len(self.word_to_id) != len(self.words):
            raise ValueError("tokenizer vocabulary has duplicate words")

    @staticmethod
    def split(text: str) -> list[str]:
        """Lower-case ``text`` and cut it into words and punctuation."""
        return _SPLIT.findall(text.lower())

    @classmethod
    def build(cls, captions: Iterable[str], max_words: int) -> Tokenizer:
        """The ``max_words`` most frequent words of ``captions`` (ties: alphabetical)."""
        counts = Counter(w for c in captions for w in cls.split(c))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in ranked[:max_words]])

    @property
    def vocab_size(self) -> int:
        """Number of ids (specials + bytes + words)."""
        return self.word_offset + len(self.words)

    def encode(self, text: str) -> list[int]:
        """``[<bos>, ids..., <eos>]`` without truncation."""
        ids = [self.bos_id]
        for w in self.split(text):
            wid = self.word_to_id.get(w)
            if wid is not None:
                ids.append(wid)
            else:
                ids.extend(self.byte_offset + b for b in w.encode("utf-8"))
        ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of :meth:`encode` up to spacing (byte runs are joined into one word)."""
        words: list[str] = []
        pending = bytearray()
        for i in ids:
            i = int(i)
            if self.byte_offset <= i < self.word_offset:
                pending.append(i - self.byte_offset)
                continue
            if pending:
                words.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if i >= self.word_offset:
                words.append(self.words[i - self.word_offset])
            elif i == self.eos_id:
                break
        if pending:
            words.append(pending.decode("utf-8", errors="replace"))
        return " ".join(words)

    def __call__(self, texts: Sequence[str], context_length: int) -> torch.Tensor:
        """``[len(texts), context_length]`` int64, padded with ``<pad>``; too long rows keep ``<eos>`` last."""
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > context_length:
                ids = ids[: context_length - 1] + [self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def to_dict(self) -> dict:
        """JSON-able description (what :meth:`from_dict` reads)."""
        return {"type": "mmfast-word-byte", "version": 1, "specials": list(_SPECIALS), "words": self.words}

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        """Rebuild a tokenizer saved with :meth:`to_dict`."""
        if d.get("type") != "mmfast-word-byte" or d.get("version") != 1:
            raise ValueError(f"not an mmfast tokenizer description: type={d.get('type')!r}, "
                             f"version={d.get('version')!r}")
        return cls(d["words"])

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))
