"""English sentences from Python's own documentation (``pydoc_data.topics``), for sentence-embedding models.

The prose paragraphs of every help topic are split into sentences; code blocks (indented), headings and
symbol-heavy lines are dropped, and only sentences of 6-40 words that start with a capital letter and end
with ``.``, ``!`` or ``?`` are kept. The unique sentences are sorted, shuffled with a fixed seed and cut into
a calibration part and an evaluation part that never share a sentence; both are tokenized with the
model's own tokenizer and right-padded to one length (sentences that need more tokens are skipped).
"""

from __future__ import annotations

import logging
import random
import re
from functools import lru_cache

import torch

log = logging.getLogger(__name__)

SEQ_LEN = 64
N_CALIB = 128
N_EVAL = 256
MIN_WORDS, MAX_WORDS = 6, 40
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_RULE_CHARS = set("*=-~^")

__all__ = ["N_CALIB", "N_EVAL", "SEQ_LEN", "all_sentences", "length_batches", "load_sentences", "sentence_split"]


def _prose(paragraph: str) -> str | None:
    lines = paragraph.split("\n")
    if any(line.startswith("   ") for line in lines):  # code / grammar blocks are indented
        return None
    if any(line.strip() and set(line.strip()) <= _RULE_CHARS for line in lines):  # a heading underline
        return None
    text = " ".join(line.strip() for line in lines).strip()
    return re.sub(r"^[*+-]\s+", "", text)  # a bullet's marker


def _keep(sentence: str) -> bool:
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters / len(sentence) >= 0.85


@lru_cache(maxsize=1)
def all_sentences() -> tuple[str, ...]:
    """Every unique prose sentence of ``pydoc_data.topics``, sorted."""
    from pydoc_data.topics import topics

    found: set[str] = set()
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            text = _prose(paragraph)
            if text:
                found.update(s.strip() for s in _SPLIT.split(text) if _keep(s.strip()))
    return tuple(sorted(found))


def sentence_split(n_calib: int, n_eval: int, seed: int = 0, length: int = SEQ_LEN) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences (each at most ``length`` tokens with the MiniLM tokenizer).

    Raises:
        ValueError: when fewer than ``n_calib + n_eval`` sentences are available.
    """
    from lowbit.zoo.minilm import load_tokenizer

    pool = list(all_sentences())
    random.Random(seed).shuffle(pool)
    tok = load_tokenizer()
    fits = [s for s, enc in zip(pool, tok.encode_batch(pool)) if len(enc.ids) <= length]
    if n_calib + n_eval > len(fits):
        raise ValueError(f"sentences: n_calib + n_eval = {n_calib + n_eval} exceeds the {len(fits)} sentences "
                         f"of at most {length} tokens")
    return fits[:n_calib], fits[n_calib:n_calib + n_eval]


def load_sentences(n_calib: int | None = None, n_eval: int | None = None, seed: int = 0,
                   length: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[n, length]`` of the calibration and evaluation sentences (defaults 128 and 256)."""
    from lowbit.zoo.minilm import tokenize

    calib, evals = sentence_split(n_calib or N_CALIB, n_eval or N_EVAL, seed, length)
    return tokenize(calib, length), tokenize(evals, length)


def length_batches(ids: torch.Tensor, batch_size: int = 16) -> list[torch.Tensor]:
    """Calibration batches with little padding: rows sorted by length, each batch cut to its longest row.

    Padding positions carry no meaning but still produce activations; trimming them keeps statistics
    (ranges, input second moments) about real tokens. The model's output does not depend on the padding.
    """
    lengths = (ids != 0).sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    batches = []
    for chunk in torch.split(order, batch_size):
        batches.append(ids[chunk, : int(lengths[chunk].max())].clone())
    return batches
