"""`testbed reproduce fleet --content recorded`: fleet scale on recorded content (docs/design.md section 8).

Every point replays a content library without models: fleet-100k's three tiers (its counts as
proportions, 60/30/10; their links and SLM speeds) all running one policy, served by V verifiers of
fleet-100k's profile (h100: 8 ms a step, max_batch 128), joined round-robin. Two content sources are
replayed on the same grid: the real Qwen pair's recording and the tiny random models' one, so the
figures show what real content changes (skip rate, payload sizes, hence uplink load and throughput)
against the same fleet.

The grid, for each source and policy:

    fleet sizes   n in sizes, with V = max(1, round(n / devices_per_verifier)) verifiers
    verifiers     at n = verifier_sweep_size, every V in verifiers

A policy's spec is the library's own (Library.policies(), by label), so its parameters are the ones
recorded. Points are resumable (testbed.study.points: a finished point is read back, not rerun).
OUT holds points/<name>/ (one run each), rows.csv, table.md, fleet_size.png, verifiers.png, index.html.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.content import Library, LibraryError
from testbed.content.library import bundled_libraries
from testbed.scenario import Scenario, load_scenario, parse_scenario
from testbed.study.points import Point, Study

BASE = "fleet-100k"  # testbed/scenarios: its tiers (counts as proportions), links, SLM speeds and verifier
SOURCES = ("recorded", "tiny")  # the real models' library, the tiny random models' one


class FleetRecordedError(ValueError):
    """A study that cannot start (a missing library, a policy it lacks): what, and how to fix it."""


@dataclass
class Grid:
    library: str = "qwen2.5-coder-humaneval"  # the real models' content: bundled name or folder
    tiny_library: str = "tiny-random"
    # hlm and u-hlm upload the full distribution (608 KB a token for Qwen: ~400 emulated packets), about
    # 100x the replay cost of these: add them with --policies for the smaller sizes.
    policies: tuple[str, ...] = ("llm-only", "cu-hlm", "cu-hlm-adaptive")
    sizes: tuple[int, ...] = (1000, 3000, 10000, 30000, 100000)
    devices_per_verifier: int = 1000  # fleet-100k: 100 verifiers for 100,000 devices
    verifier_sweep_size: int = 10000
    verifiers: tuple[int, ...] = (1, 2, 5, 10, 20)
    seed: int = 7


@dataclass(frozen=True)
class GridPoint:
    content: str  # recorded | tiny
    policy: str  # the library's policy label
    fleet_size: int
    verifiers: int

    @property
    def name(self) -> str:
        return f"{self.content}-{self.policy}-n{self.fleet_size}-v{self.verifiers}"


def grid_points(g: Grid) -> list[GridPoint]:
    """The fleet-size points, then the verifier sweep's (a point on both lists once), per source and policy."""
    out: dict[str, GridPoint] = {}
    for content in SOURCES:
        for policy in g.policies:
            pairs = [(n, max(1, round(n / g.devices_per_verifier))) for n in g.sizes]
            pairs += [(g.verifier_sweep_size, v) for v in g.verifiers]
            for n, v in pairs:
                p = GridPoint(content, policy, n, v)
                out.setdefault(p.name, p)
    return list(out.values())


def open_library(ref: str, option: str) -> Library:
    """The library `ref` (bundled name or folder), or an error saying how to find or make one."""
    try:
        return Library.open(ref)
    except LibraryError as e:
        raise FleetRecordedError(
            f"{e}\n  ({option}) list a library with `testbed content ls NAME_OR_PATH`; record one with "
            f"`testbed content record SCENARIO --out PATH` and pass {option} PATH"
        ) from None


def policy_specs(lib: Library, policies: tuple[str, ...], option: str) -> dict[str, object]:
    """label -> the spec the library recorded, for every asked policy (else an error naming what it holds)."""
    by_label: dict[str, object] = {}
    for entry in lib.policies().values():
        by_label.setdefault(entry["label"], entry["spec"])
    missing = [p for p in policies if p not in by_label]
    if missing:
        raise FleetRecordedError(
            f"content library {lib.path} ({option}) has no policy {', '.join(missing)}; it holds: "
            f"{', '.join(sorted(by_label))} (`testbed content ls {lib.path}`)"
        )
    return {p: by_label[p] for p in policies}


@dataclass
class Fleet:
    """The base fleet: its tiers (name, count, slm_ms_per_token, link) and one verifier's profile."""

    tiers: list[dict]
    server: dict


def base_fleet(name: str = BASE) -> Fleet:
    """A bundled scenario's tiers and its first server (without count: the point's), as resolved."""
    d = load_scenario(name).resolved_dict()
    keep = ("name", "count", "slm_ms_per_token", "link")
    server = {k: v for k, v in d["servers"][0].items() if k not in ("count", "region")}
    return Fleet([{k: t[k] for k in keep} for t in d["tiers"]], server)


def tier_counts(n: int, shares: list[int]) -> list[int]:
    """n devices in the tiers' shares (the remainder to the first tier)."""
    counts = [n * share // sum(shares) for share in shares]
    counts[0] += n - sum(counts)
    return counts


def point_scenario(p: GridPoint, fleet: Fleet, library: str, spec: object, seed: int) -> Scenario:
    """The point's fleet: every tier on policy `spec`, its content drawn at random from `library`."""
    counts = tier_counts(p.fleet_size, [t["count"] for t in fleet.tiers])
    tiers = [
        {**t, "count": count, "policy": spec, "content": {"library": library, "draw": "random"}}
        for t, count in zip(fleet.tiers, counts)
        if count > 0
    ]
    return parse_scenario(
        {
            "name": f"fleet-recorded-{p.name}",
            "seed": seed,
            "clock": "virtual",
            "servers": [{**fleet.server, "count": p.verifiers}],
            "routing": "round-robin",
            "tiers": tiers,
        }
    )


def row(p: GridPoint, s: dict) -> dict:
    """A point's figures from its summary.json (uplink load: bytes per emulated second, in Mbit/s)."""
    emulated = s.get("emulated_seconds") or 0.0
    uplink = s.get("uplink_bytes")
    return {
        "point": p.name,
        "content": p.content,
        "policy": p.policy,
        "fleet_size": p.fleet_size,
        "verifiers": p.verifiers,
        "throughput_tokens_per_s": (s.get("throughput_tokens_per_s") or {}).get("system"),
        "jain_fairness": s.get("jain_fairness"),
        "verifier_batch_size_mean": s.get("verifier_batch_size_mean"),
        "uplink_mbps": uplink * 8 / emulated / 1e6 if uplink is not None and emulated > 0 else None,
        "skip_rate": s.get("skip_rate"),
        "uplink_bytes_per_token": s.get("uplink_bytes_per_token"),
        "latency_p95_s": (s.get("token_latency_s") or {}).get("p95"),
        "wall_s": s.get("wall_seconds"),
    }


COLUMNS = list(row(GridPoint("", "", 0, 0), {}))


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows by policy, fleet size and verifiers, recorded next to tiny."""
    return sorted(rows, key=lambda r: (r["policy"], r["fleet_size"], r["verifiers"], SOURCES.index(r["content"])))


def write_markdown(rows: list[dict], path: Path) -> Path:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in table_rows(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


PANELS = [
    ("throughput_tokens_per_s", "system throughput (tokens/s)"),
    ("jain_fairness", "Jain fairness"),
    ("verifier_batch_size_mean", "verifier batch size (mean)"),
    ("uplink_mbps", "uplink load (Mbit/s)"),
]


def write_figures(rows: list[dict], g: Grid, out: Path) -> list[tuple[Path, str]]:
    """The 2x2 figure vs fleet size (V sized per devices_per_verifier) and vs verifiers at the sweep size
    (solid, o: recorded content; dashed, x: tiny random models)."""
    from testbed.study.plots import plot_panels

    by_size = [r for r in rows if r["verifiers"] == max(1, round(r["fleet_size"] / g.devices_per_verifier))]
    by_size = [r for r in by_size if r["fleet_size"] in g.sizes]
    sweep = [r for r in rows if r["fleet_size"] == g.verifier_sweep_size and r["verifiers"] in g.verifiers]
    return [
        (
            plot_panels(by_size, "fleet_size", "fleet size (devices)", PANELS, out / "fleet_size.png", style="content"),
            f"Against fleet size, one verifier per {g.devices_per_verifier} devices. Solid: recorded content "
            f"({g.library}); dashed: tiny random models ({g.tiny_library}).",
        ),
        (
            plot_panels(sweep, "verifiers", "verifiers", PANELS, out / "verifiers.png", style="content"),
            f"Against the number of verifiers at {g.verifier_sweep_size} devices. Solid: recorded content; "
            "dashed: tiny random models.",
        ),
    ]


def write_index(rows: list[dict], g: Grid, fleet: Fleet, figures: list[tuple[Path, str]], path: Path) -> Path:
    from html import escape

    from testbed.report import html_figure, html_page, html_table

    parts = [
        "<h1>Fleet scale on recorded content</h1>",
        f"<p class='muted'>{BASE}'s tiers ({', '.join(t['name'] for t in fleet.tiers)} in proportions "
        f"{'/'.join(str(t['count']) for t in fleet.tiers)}), one policy a point, content replayed from "
        f"{escape(g.library)} (recorded) and {escape(g.tiny_library)} (tiny), seed {g.seed}; verifiers "
        f"{escape(str(fleet.server))}, joined round-robin.</p>",
        "<h2>Figures</h2>" + "".join(html_figure(p, c) for p, c in figures),
        "<h2>Points</h2>" + html_table(COLUMNS, [[_cell(r[c]) for c in COLUMNS] for r in table_rows(rows)]),
    ]
    path.write_text(html_page("reproduce fleet --content recorded", parts), encoding="utf-8")
    return path


@dataclass
class FleetRecordedResult:
    out: Path
    report: Path
    rows: list[dict]
    statuses: dict[str, str]


def run_fleet_recorded(
    g: Grid,
    out: str | Path = "runs/reproduce-fleet-recorded",
    *,
    engine: str = "local",
    log: Callable[[str], None] | None = None,
) -> FleetRecordedResult:
    """The study (module docstring): every point run once (resumable), then rows, table, figures, index."""
    out = Path(out)
    libraries = {"recorded": (g.library, "--library"), "tiny": (g.tiny_library, "--tiny-library")}
    specs, refs = {}, {}
    for content, (ref, option) in libraries.items():  # every library and policy checked before any run
        lib = open_library(ref, option)
        specs[content] = policy_specs(lib, g.policies, option)
        refs[content] = ref if ref in bundled_libraries() else str(lib.path)
    fleet = base_fleet()
    points = grid_points(g)
    study = Study(out, engine, log, total=len(points))
    study.log(
        f"reproduce fleet --content recorded: {len(points)} points ({', '.join(g.policies)}; sizes "
        f"{', '.join(map(str, g.sizes))}; verifiers {', '.join(map(str, g.verifiers))} at {g.verifier_sweep_size}) "
        f"-> {out}"
    )
    owned_ray = engine == "ray" and _start_ray()  # one Ray for every point (each replay joins it)
    try:
        for p in points:

            def build(_study: Study, p: GridPoint = p) -> Scenario:
                return point_scenario(p, fleet, refs[p.content], specs[p.content][p.policy], g.seed)

            meta = {"content": p.content, "fleet_size": p.fleet_size, "verifiers": p.verifiers}
            study.run_point(Point(p.name, "fleet", f"{p.policy} ({p.content})", build, p.policy, meta, scored=False))
    finally:
        if owned_ray:
            import ray

            ray.shutdown()
    rows = [row(p, study.summaries[p.name]) for p in points]
    write_csv(rows, out / "rows.csv")
    write_markdown(rows, out / "table.md")
    report = write_index(rows, g, fleet, write_figures(rows, g, out), out / "index.html")
    study.log(f"rows: {out / 'rows.csv'}; table: {out / 'table.md'}; report: {report}")
    return FleetRecordedResult(out, report, rows, study.statuses)


def _start_ray() -> bool:
    """Start a local Ray unless one is up; True when this study started it (and stops it)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(include_dashboard=False, configure_logging=False)
    return True
