"""Run results: the per-token table (tokens.parquet) and the summary (summary.json).

tokens    the schema (TokenRecord: every column and its meaning), reading and writing
shards    ResultsWriter: the trace streamed to parquet shards as the run goes, merged at the end
summary   summarize: summary.json from tokens.parquet's rows (every figure's definition)
tables    a summary, and several side by side, for the terminal
"""

from testbed.results.parts import concat_parts
from testbed.results.shards import ResultsWriter, apply_patches, merge_shards, read_shards
from testbed.results.summary import STOP_REASONS, stop_figures, summarize, write_summary
from testbed.results.tables import comparison_table, format_bytes, summary_table
from testbed.results.tokens import (
    LATER_COLUMNS,
    REPORT_COLUMNS,
    SCHEMA_VERSION,
    SUMMARY_COLUMNS,
    TOKEN_COLUMNS,
    TOKENS_SCHEMA,
    TokenRecord,
    read_tokens,
    tokens_frame,
    tokens_table,
    write_tokens,
)

__all__ = [
    "LATER_COLUMNS",
    "REPORT_COLUMNS",
    "SCHEMA_VERSION",
    "STOP_REASONS",
    "SUMMARY_COLUMNS",
    "TOKEN_COLUMNS",
    "TOKENS_SCHEMA",
    "ResultsWriter",
    "TokenRecord",
    "apply_patches",
    "comparison_table",
    "concat_parts",
    "format_bytes",
    "merge_shards",
    "read_shards",
    "read_tokens",
    "stop_figures",
    "summarize",
    "summary_table",
    "tokens_frame",
    "tokens_table",
    "write_summary",
    "write_tokens",
]
