"""Jobs: a whole run from a float model to a written folder, each returning a result object.

* :func:`quantize_to_dir` (static or dynamic) → :class:`QuantizeResult` (``lowbit quantize``);
* :func:`run_search` → :class:`SearchOutcome`, the recipe a mixed-precision search found (``--min-agreement``, ...);
* :func:`run_qat` → :class:`QATResult` (``lowbit qat``);
* :func:`analyze_to_dir` → :class:`AnalyzeResult` (``lowbit analyze``).

Every job stages its folder with :func:`lowbit.outdir.staged_output`; the quantize and QAT jobs write models and
reports with :mod:`lowbit.jobs.outputs`. The CLI parses arguments into these
calls and prints their results; nothing below this package writes a job folder.
"""

from lowbit.jobs.analyze import AnalyzeResult, analyze_to_dir
from lowbit.jobs.outputs import __version__, machine_description
from lowbit.jobs.qat import QATResult, QATSettings, run_qat
from lowbit.jobs.quantize import MODES, PTQResult, QuantizeResult, quantize_to_dir
from lowbit.jobs.search import SearchOutcome, SearchRequest, run_search

__all__ = [
    "AnalyzeResult", "MODES", "PTQResult", "QATResult", "QATSettings", "QuantizeResult", "SearchOutcome", "SearchRequest", "__version__",
    "analyze_to_dir", "machine_description", "quantize_to_dir", "run_qat", "run_search",
]
