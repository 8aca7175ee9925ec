"""Calibration sharded across 2 processes (gloo, torchrun environment) gives every rank exactly the qparams
one process gets on all batches: bit for bit for min-max and the histogram calibrators (weights observed
through a histogram too), to rounding for EMA, whose result depends on the order of the stream (rank order =
the single-process order; the reversed order is measurably different)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

import lowbit
from lowbit.core import PerTensor
from lowbit.ptq.distributed import calibrate_sharded, init_from_env, shard
from lowbit.ptq.calibrate import iter_batches
from lowbit.transforms.prepare import quantizers

RECIPES = ("int8", "minmax", "entropy", "mse", "percentile_weights", "ema")
EXACT = RECIPES[:-1]

WORKER = textwrap.dedent("""
    import sys, torch
    from lowbit.ptq.distributed import init_from_env, rank_and_world
    sys.path.insert(0, sys.argv[2])
    from test_distributed_calibration import calibrated_qparams
    init_from_env(timeout_s=120)
    torch.set_num_threads(1)
    rank, world = rank_and_world()
    torch.save({"world": world, "qparams": calibrated_qparams()}, f"{sys.argv[1]}.rank{rank}")
""")


def recipe(name: str) -> lowbit.Recipe:
    base = lowbit.preset("int8")
    if name == "int8":
        return base
    if name == "percentile_weights":  # weights observed by a histogram, once per batch on every rank
        return replace(base, default_weight=replace(base.default_weight, granularity=PerTensor(), calibrator="percentile"))
    return base.with_calibrator(name)


def calibrated_qparams(order: str = "sharded") -> dict:
    """``{recipe: {quantizer: (scale, zero_point)}}`` for digits-cnn; ``order`` ``reversed`` feeds the batches
    of the second half first (what merging in the wrong rank order would mean)."""
    from lowbit import zoo

    zm, zd = zoo.load_model("digits-cnn"), zoo.load_data("digits")
    batches = list(iter_batches(zd.calib, 32))
    if order == "reversed":
        batches = shard(batches, 1, 2) + shard(batches, 0, 2)
    out = {}
    for name in RECIPES:
        prepared = lowbit.prepare_(copy.deepcopy(zm.model).eval(), recipe(name), zm.example_input)
        if order == "sharded":
            calibrate_sharded(prepared, zd.calib, batch_size=32)
        else:
            lowbit.calibrate(prepared, batches, show_progress=False)
        lowbit.convert_(prepared)
        out[name] = {n: (q.scale.clone(), q.zero_point.clone()) for n, q in quantizers(prepared) if q.spec is not None}
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    out = tmp / "qparams"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    procs = [subprocess.Popen([sys.executable, str(script), str(out), os.path.dirname(__file__)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]


def _free_port() -> int:
    from lowbit.cli.launch import free_port

    return free_port()


@pytest.fixture(scope="module")
def single():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: activations identical to the last bit
    try:
        return calibrated_qparams(), calibrated_qparams("reversed")
    finally:
        torch.set_num_threads(threads)


def test_every_rank_ends_with_the_same_qparams(two_ranks):
    a, b = two_ranks
    assert a["world"] == b["world"] == 2
    for name in RECIPES:
        for q, (s, z) in a["qparams"][name].items():
            assert torch.equal(s, b["qparams"][name][q][0]) and torch.equal(z, b["qparams"][name][q][1]), (name, q)


@pytest.mark.parametrize("name", EXACT)
def test_two_process_calibration_equals_one_process_bit_for_bit(two_ranks, single, name):
    dist, ref = two_ranks[0]["qparams"][name], single[0][name]
    assert dist.keys() == ref.keys() and len(ref) == 12  # 5 weights, 7 activations
    for q, (s, z) in ref.items():
        assert torch.equal(dist[q][0], s) and torch.equal(dist[q][1], z), q


def test_ema_merge_follows_the_rank_order(two_ranks, single):
    dist, in_order, reversed_ = two_ranks[0]["qparams"]["ema"], single[0]["ema"], single[1]["ema"]
    gaps_in_order, gaps_reversed = [], []
    for q, (s, z) in in_order.items():
        torch.testing.assert_close(dist[q][0], s, rtol=1e-5, atol=0)
        gaps_in_order.append(float(((dist[q][0] - s) / s).abs().max()))
        gaps_reversed.append(float(((dist[q][0] - reversed_[q][0]) / s).abs().max()))
    assert max(gaps_reversed) > 100 * max(max(gaps_in_order), 1e-7)


def test_shards_are_contiguous_and_cover_the_stream():
    items = list(range(9))
    parts = [shard(items, r, 2) for r in range(2)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert sum((shard(items, r, 4) for r in range(4)), []) == items
    assert shard([1], 1, 2) == [1] and shard([1], 0, 2) == []


def test_without_a_process_group_sharded_calibration_is_plain_calibration(digits):
    model, calib, x_eval, _ = digits
    recipe_ = lowbit.preset("int8")
    a = lowbit.prepare_(copy.deepcopy(model).eval(), recipe_, x_eval[:1])
    calibrate_sharded(a, calib)
    b = lowbit.prepare_(copy.deepcopy(model).eval(), recipe_, x_eval[:1])
    lowbit.calibrate(b, calib, show_progress=False)
    for (n, qa), (_, qb) in zip(quantizers(lowbit.convert_(a)), quantizers(lowbit.convert_(b))):
        assert torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero_point, qb.zero_point), n
    assert init_from_env() is False  # WORLD_SIZE unset: nothing to join


def test_init_from_env_names_the_missing_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="MASTER_PORT"):
        init_from_env()
