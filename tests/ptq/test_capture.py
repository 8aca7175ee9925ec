"""The capture helper: patch layout against torch's own conv, moments against naive sums, early stop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.ptq import capture
from lowbit.ptq.capture import ForwardLoop, InputMoments, layer_order, patches, run_until, weight_matrix

LAYERS = [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
    nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise
    nn.Conv2d(4, 6, (1, 3), groups=2),
    nn.Conv1d(4, 6, 3, padding=1),
    nn.Linear(5, 7),
]


def _input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 2, layer.in_features)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(2, layer.in_channels, 9)
    return torch.randn(2, layer.in_channels, 7, 8)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda m: repr(m))
def test_weight_times_patches_is_the_layer_output(layer):
    x = _input(layer)
    p = patches(layer, x)  # [G, n, d]
    w = weight_matrix(layer)  # [G, r, d]
    y = torch.bmm(p, w.transpose(1, 2))  # [G, n, r]
    ref = layer(x) - (0 if layer.bias is None else layer.bias.reshape((-1,) + (1,) * (x.ndim - 2) if not isinstance(layer, nn.Linear) else -1))
    if isinstance(layer, nn.Linear):
        torch.testing.assert_close(y[0].reshape(ref.shape), ref, atol=1e-5, rtol=1e-5)
        return
    # ref [B, C, *spatial] -> [G, B·L, r]
    g = w.shape[0]
    b, c = ref.shape[:2]
    ref_g = ref.reshape(b, g, c // g, -1).permute(1, 0, 3, 2).reshape(g, -1, c // g)
    torch.testing.assert_close(y, ref_g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", LAYERS[:3] + LAYERS[5:], ids=lambda m: type(m).__name__)
def test_moments_equal_naive_sums_and_do_not_depend_on_chunking(layer, monkeypatch):
    x = _input(layer)
    p = patches(layer, x).double()
    naive_h = torch.stack([sum(torch.outer(v, v) for v in pg) for pg in p])
    m = InputMoments.empty(layer)
    monkeypatch.setattr(capture, "CHUNK_ELEMENTS", 1)  # one sample per chunk
    m.update(layer, x)
    torch.testing.assert_close(m.hessian, naive_h, atol=1e-5, rtol=1e-5)  # float32 products, float64 sums
    torch.testing.assert_close(m.mean, p.mean(dim=1), atol=1e-6, rtol=1e-6)
    assert m.count == p.shape[1]


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.calls = {"a": 0, "b": 0, "c": 0}

    def forward(self, x):
        for name in ("a", "b", "c"):
            self.calls[name] += 1
            x = getattr(self, name)(x)
        return x


def test_run_until_stops_each_pass_at_the_layer():
    model = _Chain()
    seen = []
    n = run_until(model, ForwardLoop(torch.randn(10, 4), batch_size=4), model.b, on_input=seen.append)
    assert n == 3 and [t.shape[0] for t in seen] == [4, 4, 2]
    assert model.calls["c"] == 0  # every pass stopped at b


def test_forward_loop_respects_max_batches_and_callables():
    data = torch.randn(10, 4)
    assert len(list(ForwardLoop(data, batch_size=3, max_batches=2).batches())) == 2
    seen = []
    loop = ForwardLoop(lambda model: seen.append(model(torch.ones(1, 4))))
    loop(nn.Linear(4, 1))
    assert len(seen) == 1
    with pytest.raises(TypeError, match="cannot be cut into batches"):
        list(loop.batches())
    with pytest.raises(ValueError, match="empty"):
        ForwardLoop(torch.randn(0, 4))(nn.Linear(4, 1))


def test_layer_order_follows_execution(digits):
    import lowbit

    model, calib, _, _ = digits
    q = lowbit.prepare_(__import__("copy").deepcopy(model).eval(), lowbit.preset("int8"), calib[:1])
    names = [n for n, _ in layer_order(q, ForwardLoop(calib[:4]))]
    assert names == ["conv1", "res_conv1", "res_conv2", "down_conv", "fc"]
