"""BatchNorm folding: the pure function against running layer → BN in eval mode, and the fx pass."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

from lowbit.transforms.bn_fold import fold_bn_graph, fold_bn_sequential, fold_bn_weights, fold_into

LAYERS = {
    "conv2d": (lambda bias: nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.BatchNorm2d, (2, 3, 7, 7), 0),
    "conv1d": (lambda bias: nn.Conv1d(3, 6, 3, bias=bias), nn.BatchNorm1d, (2, 3, 11), 0),
    "linear": (lambda bias: nn.Linear(5, 6, bias=bias), nn.BatchNorm1d, (4, 5), 0),
    "convT2d": (lambda bias: nn.ConvTranspose2d(3, 6, 2, stride=2, bias=bias), nn.BatchNorm2d, (2, 3, 4, 4), 1),
}


def _random_bn(cls, affine: bool) -> nn.Module:
    bn = cls(6, affine=affine, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6))
        bn.running_var.copy_(torch.rand(6) * 2 + 0.1)
        if affine:
            bn.weight.copy_(torch.randn(6))
            bn.bias.copy_(torch.randn(6))
    return bn.eval()


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_bn_weights_matches_layer_then_bn(kind, bias, affine):
    make, bn_cls, shape, out_axis = LAYERS[kind]
    layer = make(bias).eval()
    bn = _random_bn(bn_cls, affine)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = bn(layer(x))
        w, b = fold_bn_weights(
            layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
            bn.weight if affine else None, bn.bias if affine else None, out_axis,
        )
        folded = copy.deepcopy(layer)
        folded.weight.copy_(w)
        folded.bias = nn.Parameter(b)
        out = folded(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # fold_into does the same in place
    fold_into(layer, bn)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)
    assert layer.bias is not None


def test_fold_bn_weights_hand_computed():
    w = torch.tensor([[2.0], [4.0]])
    b = torch.tensor([1.0, -1.0])
    mean, var, eps = torch.tensor([0.5, 1.0]), torch.tensor([3.0, 15.0]), 1.0
    gamma, beta = torch.tensor([2.0, 0.5]), torch.tensor([0.1, 0.2])
    nw, nb = fold_bn_weights(w, b, mean, var, eps, gamma, beta)
    # k = gamma / sqrt(var + eps) = [1.0, 0.125]
    assert torch.equal(nw, torch.tensor([[2.0], [0.5]]))
    torch.testing.assert_close(nb, torch.tensor([0.5 * 1.0 + 0.1, -2.0 * 0.125 + 0.2]), rtol=0, atol=1e-7)


def test_fold_rejects_grouped_conv_transpose():
    layer = nn.ConvTranspose2d(4, 4, 2, groups=2)
    with pytest.raises(ValueError, match="grouped ConvTranspose"):
        fold_into(layer, nn.BatchNorm2d(4).eval())


class _ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = _random_bn(nn.BatchNorm2d, True)
        self.shared = nn.Conv2d(6, 6, 1)
        self.bn2 = _random_bn(nn.BatchNorm2d, True)

    def forward(self, x):
        y = self.shared(torch.relu(self.bn(self.conv(x))))
        return self.bn2(y) + y  # conv output used twice: bn2 cannot be folded


def test_fold_bn_graph_folds_only_single_use_pairs():
    model = _ConvBnNet().eval()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    gm = fx.symbolic_trace(copy.deepcopy(model))
    assert fold_bn_graph(gm) == ["bn"]
    assert not hasattr(gm, "bn") and hasattr(gm, "bn2")
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-5)


def test_fold_bn_graph_refuses_training_bn():
    model = _ConvBnNet().eval()
    gm = fx.symbolic_trace(model)
    gm.bn.train()
    with pytest.raises(ValueError, match="BatchNorm bn is in training mode"):
        fold_bn_graph(gm)


def test_fold_bn_sequential():
    seq = nn.Sequential(nn.Sequential(nn.Conv2d(3, 6, 3), _random_bn(nn.BatchNorm2d, True), nn.ReLU())).eval()
    x = torch.randn(1, 3, 6, 6)
    ref = seq(x)
    assert fold_bn_sequential(seq) == ["0.1"]
    assert isinstance(seq[0][1], nn.Identity)
    torch.testing.assert_close(seq(x), ref, rtol=0, atol=1e-5)
