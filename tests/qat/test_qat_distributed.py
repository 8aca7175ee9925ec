"""QAT under DistributedDataParallel in 2 processes (gloo, torchrun environment): every rank ends with the
same weights, learnt ranges, EMA observer states, BatchNorm statistics and step counters, bit for bit, and
the run follows one process training on the same global batches (to float rounding)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lowbit
from lowbit import qat
from lowbit.core import PerChannel, PerTensor, QuantSpec

RECIPE = lowbit.Recipe(
    default_weight=QuantSpec(bits=4, signed=True, symmetric=True, granularity=PerChannel(0), calibrator="minmax"),
    default_input=QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor(), calibrator="minmax"),
)
WORKER = textwrap.dedent("""
    import sys, torch
    from lowbit.ptq.distributed import init_from_env, rank_and_world
    sys.path.insert(0, sys.argv[2])
    from test_qat_distributed import run_qat_steps
    init_from_env(timeout_s=120)
    torch.set_num_threads(1)
    torch.save(run_qat_steps(), f"{sys.argv[1]}.rank{rank_and_world()[0]}")
""")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(self.pool(self.relu(self.conv2(y) + y)), 1))


def run_qat_steps() -> dict:
    """4 steps of 16 samples (8 per rank with 2 ranks): 2 with EMA observers and live BN, then LSQ."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, 5, 5, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    model = qat.prepare_qat_(Net(), RECIPE, x[:1], qat.QATConfig(observer_steps=2, ema_momentum=0.5))
    state = qat.train_qat(model, x, y, config=qat.TrainConfig(epochs=2, batch_size=16, lr=1e-2, schedule="constant"))
    return {"state_dict": model.state_dict(), "loss": [e.loss for e in state.log]}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from lowbit.cli.launch import free_port, worker_env

    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "worker.py").write_text(WORKER)
    out, port = tmp / "result", free_port()
    procs = [subprocess.Popen([sys.executable, str(tmp / "worker.py"), str(out), os.path.dirname(__file__)],
                              env=dict(worker_env(r, 2, port), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE"),
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]


def _flat(state: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_rank_holds_the_same_qat_state(ranks):
    a, b = (_flat(r["state_dict"]) for r in ranks)
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, key
    assert int(a["conv.qat_steps"]) == 4 and int(a["lowbit_act.conv_q.qat_steps"]) == 4
    assert a["lowbit_act.conv_q._extra_state/ranges_ready"] is True
    assert a["lowbit_act.conv_q._extra_state/observer/stats/batches"] == 2  # the EMA saw the 2 global batches
    assert int(a["conv.bn.num_batches_tracked"]) == 4
    assert ranks[0]["loss"] == ranks[1]["loss"]


def test_two_ranks_follow_one_process_on_the_global_batches(ranks):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_qat_steps()
    finally:
        torch.set_num_threads(threads)
    two = ranks[0]["state_dict"]
    for key, ref in one["state_dict"].items():
        if key.endswith("_extra_state"):
            for k, v in ref["observer"]["stats"].items():  # EMA of activations, min-max of the current weights
                got = two[key]["observer"]["stats"][k]
                if isinstance(v, torch.Tensor):
                    torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-6)
                else:
                    assert got == v, (key, k)
        elif ref.is_floating_point():  # AdamW normalises each gradient: an ε-sized one (the pooled activation's
            # range) moves by a float-noise-dependent fraction of a step (lr 1e-2); allow a tenth of a step
            torch.testing.assert_close(two[key], ref, rtol=1e-4, atol=1e-3, msg=key)
        else:
            assert torch.equal(two[key], ref), key
    assert ranks[0]["loss"] == pytest.approx(one["loss"], rel=1e-6)
