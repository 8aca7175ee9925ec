"""``quantize_dynamic_``: which layers are swapped, rules, per-token recipes, convolutions refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit import LayerRule
from lowbit.core import PerChannel, PerTensor
from lowbit.nn.dynamic import QuantDynamicGRU, QuantDynamicLinear, QuantDynamicLSTM
from lowbit.nn.embedding import QuantEmbedding
from lowbit.transforms.dynamic import dynamic_layers, dynamic_recipe, quantize_dynamic_, quantize_embeddings_
from lowbit.transforms.recipe import machine_weight_bits


class Tagger(nn.Module):
    """Embedding → LSTM → GRU → Linear head (a sequence tagger)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.lstm = nn.LSTM(12, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, ids):
        x, _ = self.lstm(self.emb(ids))
        x, _ = self.gru(x)
        return self.head(x)


def test_swaps_linear_lstm_gru_and_stays_close_to_float():
    torch.manual_seed(0)
    model = Tagger().eval()
    ids = torch.randint(0, 50, (4, 9))
    with torch.no_grad():
        ref = model(ids)
    q = quantize_dynamic_(_copy(model), dynamic_recipe())
    assert isinstance(q.lstm, QuantDynamicLSTM) and isinstance(q.gru, QuantDynamicGRU)
    assert isinstance(q.head, QuantDynamicLinear) and isinstance(q.emb, QuantEmbedding)
    assert [n for n, _ in dynamic_layers(q)] == ["lstm", "gru", "head"]
    assert q.lowbit_info.layer_kinds == {"emb": "Embedding", "lstm": "LSTM", "gru": "GRU", "head": "Linear"}
    assert q.emb.weight_quantizer.spec.bits == 8  # a gather has no u8 x s8 product: 8 bits even on CPUs without VNNI
    with torch.no_grad():
        out = q(ids)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_default_recipe_is_per_token_with_engine_weight_bits():
    assert dynamic_recipe().machine_weight_bits  # resolved when the job runs
    r = dynamic_recipe().for_machine()
    assert r.default_weight.bits == machine_weight_bits() and isinstance(r.default_weight.granularity, PerChannel)
    assert isinstance(r.default_input.granularity, PerChannel) and not r.default_input.signed
    assert isinstance(dynamic_recipe(per_token=False).default_input.granularity, PerTensor)
    q = quantize_dynamic_(nn.Sequential(nn.Linear(4, 4)).eval(), dynamic_recipe(per_token=False))
    assert q[0].per_token is False


def test_rules_keep_layers_float_and_are_reported():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    q = quantize_dynamic_(model, dynamic_recipe().keep_float("2"))
    assert isinstance(q[0], QuantDynamicLinear) and type(q[2]) is nn.Linear
    assert ("2", "kept in float by a recipe rule") in q.lowbit_info.float_layers


def test_convolutions_are_refused_naming_the_layer_unless_kept_float():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)).eval()
    with pytest.raises(ValueError, match=r"layer 0: dynamic quantization of Conv2d is refused"):
        quantize_dynamic_(model, dynamic_recipe())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)).eval()
    q = quantize_dynamic_(model, dynamic_recipe().with_rules(LayerRule("type:Conv2d", None, None)))
    assert type(q[0]) is nn.Conv2d and isinstance(q[2], QuantDynamicLinear)


def test_bad_activation_specs_and_training_mode_are_refused():
    from dataclasses import replace

    recipe = dynamic_recipe()
    with pytest.raises(ValueError, match="fc.*8-bit"):
        quantize_dynamic_(nn.ModuleDict({"fc": nn.Linear(2, 2)}).eval(), replace(recipe, default_input=replace(recipe.default_input, bits=4)))
    with pytest.raises(ValueError, match="eval-mode"):
        quantize_dynamic_(nn.Linear(2, 2).train(), recipe)
    model = quantize_dynamic_(nn.Sequential(nn.Linear(2, 2)).eval(), recipe)
    with pytest.raises(ValueError, match="already dynamically quantized"):
        quantize_dynamic_(model, recipe)


def test_embedding_rules_and_quantize_embeddings_for_other_models():
    model = quantize_dynamic_(Tagger().eval(), dynamic_recipe().keep_float("type:Embedding"))
    assert type(model.emb) is nn.Embedding and ("emb", "kept in float by a recipe rule") in model.lowbit_info.float_layers
    plain = Tagger().eval()
    assert quantize_embeddings_(plain) == ["emb"] and isinstance(plain.emb, QuantEmbedding)
    assert isinstance(plain.head, nn.Linear) and not isinstance(plain.head, QuantDynamicLinear)
