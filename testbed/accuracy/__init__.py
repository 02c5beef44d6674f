"""Task accuracy of a finished run: HumanEval pass@1 from the problems' own unit tests.

completion   a device's committed tokens as the completion its tests run
sandbox      each program in its own limited interpreter (not a security sandbox)
statistics   pass rates, unbiased pass@k, paired comparisons against a reference run
score        score_run: accuracy.parquet and summary.json's accuracy block
"""

from testbed.accuracy.completion import (
    END_TOKENS,
    STOP_SEQUENCES,
    check_program,
    completion_text,
    cut_at_stop,
    end_token_ids,
)
from testbed.accuracy.sandbox import DEFAULT_TIMEOUT_S, PASSED, TIMED_OUT, run_program, run_programs
from testbed.accuracy.score import (
    ACCURACY_FILE,
    ACCURACY_VERSION,
    ROW_COLUMNS,
    AccuracyError,
    AccuracyResult,
    read_accuracy,
    score_run,
)
from testbed.accuracy.statistics import (
    PASS_AT_K,
    agreement,
    binomial_two_sided_p,
    paired,
    pass_at_k,
    pass_stats,
    problem_counts,
    relative,
    t_quantile,
    unbiased_pass,
)

__all__ = [
    "ACCURACY_FILE",
    "ACCURACY_VERSION",
    "DEFAULT_TIMEOUT_S",
    "END_TOKENS",
    "PASSED",
    "PASS_AT_K",
    "ROW_COLUMNS",
    "STOP_SEQUENCES",
    "TIMED_OUT",
    "AccuracyError",
    "AccuracyResult",
    "agreement",
    "binomial_two_sided_p",
    "check_program",
    "completion_text",
    "cut_at_stop",
    "end_token_ids",
    "paired",
    "pass_at_k",
    "pass_stats",
    "problem_counts",
    "read_accuracy",
    "relative",
    "run_program",
    "run_programs",
    "score_run",
    "t_quantile",
    "unbiased_pass",
]
