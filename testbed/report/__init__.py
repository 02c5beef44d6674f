"""Run reports: PNG plots and one self-contained HTML page from run directories.

A run directory holds tokens.parquet, summary.json and scenario.yaml (testbed/results.py).
`write_report(run_dirs, out_dir)` draws, for every run:

- throughput: per tier, and per device (fairness, with Jain's index);
- timeline: uploads and skips over emulated time, and a per-device raster of both;
- uncertainty vs beta: observed beta of uploads and shadow beta of skipped tokens, the fitted
  line beta ~ a*u + b, the paper's line, the risk-averse threshold u_th = -b/a (docs/design.md
  section 1, step 3);
- k and payload distributions of the uploads;
- token latency CDF per tier with p50/p95/p99;

and, when several runs are given, policies side by side: throughput vs accuracy proxy vs uplink
bytes. Accuracy proxies: the acceptance rate (accepted / uploaded drafts) and the LLM agreement,
1 - mean beta over all drafted tokens (shadow beta for skipped ones): the expected fraction of
tokens the LLM would have kept as drafted. Fidelity (exact, no sampling noise; docs/design.md
section 7) is a table row: the mean per-token TV distance to the LLM's distribution, and its sum
over a device's sequence (mean over devices), which bounds how far the law of a device's output
is from the LLM's (testbed/results.py defines both).

The package reads as the report is made: `data` (what it reads: summary.json's figures, and the
few only the tokens hold), `plots` (one function per figure), `html` (the page). The PNGs are
written next to report.html, which embeds them (base64): the page stands alone.
"""

from testbed.report.data import Run, expand_run_dirs, load_run, run_figures
from testbed.report.html import format_value, html_figure, html_page, html_table, write_report
from testbed.report.plots import PLOTS, new_figure

__all__ = [
    "PLOTS",
    "Run",
    "expand_run_dirs",
    "format_value",
    "html_figure",
    "html_page",
    "html_table",
    "load_run",
    "new_figure",
    "run_figures",
    "write_report",
]
