"""tokens.parquet of a run replayed in partitions (testbed.run.partitions): each partition's rows are
one sorted file; the run's file is those files one after the other, a row group at a time (memory
holds a row group, not the run), so its rows are sorted by device within each verifier's partition."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow.parquet as pq

from testbed.results.tokens import TOKENS_SCHEMA


def concat_parts(parts: Iterable[str | Path], path: str | Path, remove: bool = True) -> int:
    """Write the partitions' files `parts` as one parquet file `path`; returns its rows. The parts are
    removed once written (`remove`)."""
    parts, path = [Path(p) for p in parts], Path(path)
    tmp = path.with_suffix(".tmp")
    rows = 0
    with pq.ParquetWriter(tmp, TOKENS_SCHEMA) as out:
        for part in parts:
            f = pq.ParquetFile(part)
            for i in range(f.num_row_groups):
                table = f.read_row_group(i)
                rows += table.num_rows
                out.write_table(table.cast(TOKENS_SCHEMA))
    tmp.replace(path)
    if remove:
        for part in parts:
            part.unlink(missing_ok=True)
        for folder in {part.parent for part in parts}:
            try:
                folder.rmdir()
            except OSError:  # something else is in it
                pass
    return rows
