"""Link traces: rate, delay and loss over time, replayed as step functions.

CSV format (one header line, '#' lines are comments, blank lines ignored):

    time_s,rate_mbps,delay_ms,loss
    0.0,12.5,40,0.0
    0.1,11.0,42,0.001

- `time_s` (or `time_ms`): when the row's values start; the first row at 0, strictly
  increasing. A row holds until the next row's time; the last row holds for as long as the
  step before it, which gives the trace's duration (after which it loops, or holds the last
  row when `loop` is off).
- Optional value columns, at least one: rate (`rate_bps`, `rate_kbps`, `rate_mbps`; 0 = outage),
  one-way delay (`delay_s`, `delay_ms`), loss probability (`loss`, 0..1). A column the trace
  lacks comes from the link profile's static value.

Bundled traces live in netem/data/<name>.csv (see `list_traces()`); netem/data/make_traces.py
says how each was made and from which sources its numbers come.
"""

from __future__ import annotations

import bisect
import csv
import functools
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

_TIME_COLUMNS = {"time_s": 1.0, "time_ms": 1e-3}
_VALUE_COLUMNS = {
    "rate_bps": ("rate_bps", 1.0),
    "rate_kbps": ("rate_bps", 1e3),
    "rate_mbps": ("rate_bps", 1e6),
    "delay_s": ("delay_s", 1.0),
    "delay_ms": ("delay_s", 1e-3),
    "loss": ("loss", 1.0),
}


@dataclass(frozen=True)
class Trace:
    """A parsed trace: `times` are step starts (s); value tuples are None when absent."""

    source: str  # bundled name or file path, for display and round trips
    times: tuple[float, ...]
    duration_s: float
    rate_bps: tuple[float, ...] | None = None
    delay_s: tuple[float, ...] | None = None
    loss: tuple[float, ...] | None = None
    loop: bool = True
    random_start: bool = False  # each link starts at its own seeded offset into the trace

    def index(self, t: float) -> tuple[int, float]:
        """(row in force at emulated time t, time when the next row starts)."""
        looping = self.loop and self.duration_s > 0
        if looping:
            local = t % self.duration_s
            base = t - local
        else:
            local, base = t, 0.0
        i = max(0, bisect.bisect_right(self.times, local) - 1)
        if i + 1 < len(self.times):
            end = base + self.times[i + 1]
        elif looping:
            end = base + self.duration_s
        else:
            return i, math.inf
        if end <= t:  # float rounding at a step edge: move on to the next step
            end = math.nextafter(t, math.inf)
        return i, end

    def value_at(self, column: str, t: float) -> float:
        values: tuple[float, ...] = getattr(self, column)
        return values[self.index(t)[0]]

    def columns(self) -> list[str]:
        return [c for c in ("rate_bps", "delay_s", "loss") if getattr(self, c) is not None]

    def with_options(self, *, loop: bool | None = None, random_start: bool | None = None) -> Trace:
        return replace(
            self,
            loop=self.loop if loop is None else loop,
            random_start=self.random_start if random_start is None else random_start,
        )


def parse_trace(text: str, source: str = "<trace>") -> Trace:
    """Parse trace CSV text; errors name the source, line and column."""
    lines = [
        (n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise ValueError(f"{source}: empty trace (expected a header line such as 'time_s,rate_mbps,delay_ms,loss')")
    header_line, header = lines[0]
    names = [h.strip() for h in next(csv.reader([header]))]
    time_cols = [c for c in names if c in _TIME_COLUMNS]
    if len(time_cols) != 1:
        raise ValueError(
            f"{source}:{header_line}: expected exactly one time column (time_s or time_ms), got header {names}"
        )
    fields: dict[str, str] = {}
    for c in names:
        if c in _TIME_COLUMNS:
            continue
        if c not in _VALUE_COLUMNS:
            raise ValueError(
                f"{source}:{header_line}: unknown column {c!r}; expected "
                f"{', '.join(list(_TIME_COLUMNS) + list(_VALUE_COLUMNS))}"
            )
        field = _VALUE_COLUMNS[c][0]
        if field in fields:
            raise ValueError(f"{source}:{header_line}: columns {fields[field]!r} and {c!r} both give {field}")
        fields[field] = c
    if not fields:
        raise ValueError(f"{source}:{header_line}: no value column; expected at least one of rate_*, delay_*, loss")

    times: list[float] = []
    values: dict[str, list[float]] = {f: [] for f in fields}
    for n, line in lines[1:]:
        cells = [x.strip() for x in next(csv.reader([line]))]
        if len(cells) != len(names):
            raise ValueError(f"{source}:{n}: expected {len(names)} values ({', '.join(names)}), got {len(cells)}")
        row = dict(zip(names, cells))
        t = _cell(source, n, time_cols[0], row[time_cols[0]]) * _TIME_COLUMNS[time_cols[0]]
        if not times and t != 0:
            raise ValueError(f"{source}:{n}: the first row must start at time 0, got {row[time_cols[0]]}")
        if times and t <= times[-1]:
            raise ValueError(f"{source}:{n}: times must strictly increase ({row[time_cols[0]]} after {times[-1]:g} s)")
        times.append(t)
        for field, col in fields.items():
            v = _cell(source, n, col, row[col])
            if field == "loss" and v > 1:
                raise ValueError(f"{source}:{n}: column 'loss' expected a probability in [0, 1], got {row[col]}")
            values[field].append(v * _VALUE_COLUMNS[col][1])
    if not times:
        raise ValueError(f"{source}: the trace has a header but no rows")
    duration = times[-1] + (times[-1] - times[-2]) if len(times) > 1 else 0.0
    columns = {f: tuple(v) for f, v in values.items()}
    return Trace(
        source=source,
        times=tuple(times),
        duration_s=duration,
        loop=len(times) > 1,
        rate_bps=columns.get("rate_bps"),
        delay_s=columns.get("delay_s"),
        loss=columns.get("loss"),
    )


def _cell(source: str, line: int, column: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{source}:{line}: column {column!r} expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{source}:{line}: column {column!r} expected a finite number >= 0, got {text!r}")
    return v


def list_traces() -> list[str]:
    """Names of the bundled traces."""
    data = resources.files("netem") / "data"
    return sorted(p.name[:-4] for p in data.iterdir() if p.name.endswith(".csv"))


@functools.cache
def _load_bundled(name: str) -> Trace:
    text = (resources.files("netem") / "data" / f"{name}.csv").read_text()
    return parse_trace(text, source=name)


@functools.cache
def _load_file(path: str) -> Trace:
    return parse_trace(Path(path).read_text(), source=path)


def load_trace(name_or_path: str) -> Trace:
    """A bundled trace by name, or a CSV file by path. Parsed once and cached."""
    if name_or_path in list_traces():
        return _load_bundled(name_or_path)
    p = Path(name_or_path)
    if p.suffix == ".csv" or p.exists():
        if not p.exists():
            raise ValueError(f"trace file {name_or_path!r} does not exist")
        return _load_file(str(p.resolve()))
    raise ValueError(
        f"unknown trace {name_or_path!r}; bundled traces: {', '.join(list_traces())} (or give a .csv path)"
    )


def trace_from_rows(
    rows: Iterable[Sequence[object]],
    columns: Sequence[str] = ("time_s", "rate_mbps", "delay_ms", "loss"),
    source: str = "<rows>",
) -> Trace:
    """Build a trace from in-memory rows (same rules as the CSV form)."""
    buf = io.StringIO()
    csv.writer(buf).writerows([columns, *rows])
    return parse_trace(buf.getvalue(), source=source)
