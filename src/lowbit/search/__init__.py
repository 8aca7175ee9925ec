"""Mixed precision: accuracy-driven fallback to float, and bit allocation under a size budget.

Both search over recipes and return one (:class:`~lowbit.transforms.recipe.Recipe`):

* :func:`fallback` — the fewest layers kept in float so that top-1 agreement / the metric drop meets a
  target (:mod:`lowbit.search.fallback`);
* :func:`allocate_bits` — per-layer weight bits {2, 4, 8} and activation bits {8, 16} minimising the
  measured loss estimate under a size / average-bits budget, solved exactly, with a Pareto sweep
  (:mod:`lowbit.search.bits`).

Candidates run through a *runner* (default: the PyTorch simulation, :func:`torch_runner`); the quantize job
passes :func:`onnxruntime_runner`, which runs the exported model on ONNX Runtime.
"""

from lowbit.search.bits import AllocationResult, allocate_bits
from lowbit.search.candidates import CandidateBuilder
from lowbit.search.scoring import Score, Scorer, Target, onnxruntime_runner, torch_runner
from lowbit.search.fallback import FallbackResult, fallback, ranking_from_analysis
from lowbit.search.knapsack import solve_dp, solve_milp
from lowbit.search.pareto import front, search_html

__all__ = [
    "AllocationResult", "CandidateBuilder", "FallbackResult", "Score", "Scorer", "Target", "allocate_bits",
    "fallback", "front", "onnxruntime_runner", "ranking_from_analysis", "search_html", "solve_dp", "solve_milp", "torch_runner",
]
