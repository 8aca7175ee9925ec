"""Static recipes on recurrent models: refused in one line pointing to --mode dynamic, or kept float on purpose
and then reported (recipe rule and the LSTM node ONNX Runtime runs in float, once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.cli.main import main
from lowbit.jobs import quantize_to_dir
from lowbit.report.evaluate import EvalSet

HERE = Path(__file__).parent


class Tagger(nn.Module):
    def __init__(self, cell: type = nn.LSTM) -> None:
        super().__init__()
        self.rnn = cell(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def tagger():
    """``--model test_recurrent_static:tagger``."""
    return Tagger(), torch.randn(1, 5, 4)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_static_quantize_refuses_recurrent_layers(cell):
    x = torch.randn(8, 5, 4)
    with pytest.raises(ValueError, match=rf"layer 'rnn' is an nn.{cell.__name__}: .* use --mode dynamic"):
        lowbit.quantize(Tagger(cell).eval(), [x], lowbit.preset("int8"), x[:1], show_progress=False)


def test_cli_static_lstm_is_one_error_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    data = tmp_path / "seq.pt"
    torch.save(torch.randn(16, 5, 4), data)
    out = tmp_path / "out"
    rc = main(["quantize", "--model", "test_recurrent_static:tagger", "--input-shape", "1,5,4", "--data", str(data),
               "--out", str(out), "--repeats", "1"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("lowbit: error: layer 'rnn' is an nn.LSTM") and "--mode dynamic" in err[0]
    assert not out.exists()


def test_lstm_kept_float_by_a_rule_is_reported_once(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 5, 4)
    recipe = lowbit.preset("int8").keep_float("rnn")
    result = quantize_to_dir(Tagger().eval(), x[:1], list(x.split(16)), recipe, tmp_path / "out", EvalSet(x),
                             repeats=2, show_progress=False)
    report = result.report
    rnn = [f for f in report["float_layers"] if f["layer"] == "rnn"]
    assert len(rnn) == 1 and rnn[0]["reason"].startswith("kept in float by a recipe rule")
    assert rnn[0].get("op") == "LSTM"  # ONNX Runtime's float LSTM node, merged into the rule's entry
    assert report["executed_op_types"].get("LSTM") == 1
    assert not any(f["layer"] != "rnn" and f.get("op") == "LSTM" for f in report["float_layers"])
    assert "- `rnn` (ONNX node `" in (tmp_path / "out" / "report.md").read_text()
