"""`testbed reproduce paper|fleet|sweep`: the CU-HLM / U-HLM experiments end to end (testbed/study/)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="Reproduce the CU-HLM / U-HLM papers' experiments (resumable).")

SIZE_HELP = (
    "smoke (tiny models, seconds) | small (Qwen pair, HumanEval/40..55, 256 tokens with stops, ~1 h on 2 CPU "
    "cores with bf16) | medium (164 problems, overnight on a CPU) | full (164 problems x 5 samples, GPU)"
)


def _sets(values: list[str] | None) -> dict:
    """KEY=VALUE overrides for every point (values parsed as YAML: 1, 0.5, true, cuda, ...)."""
    import yaml

    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _with_samples(size, samples: int | None):
    import dataclasses

    return size if samples is None else dataclasses.replace(size, samples=samples)


def _print_estimate(est: dict, json_out: bool, err) -> None:
    """The estimate as JSON on stdout, or in words on stderr (one line per CPU class)."""
    if json_out:
        print(json.dumps(est, indent=2))
        return
    st = est["token_steps"]
    err.print(
        f"reproduce {est['kind']} --size {est['size']}: {est['runs']} runs, {est['devices']} devices "
        f"({est['samples']} per problem), up to {est['max_new_tokens']} tokens each ending at eos / "
        f"stop sequences: {st[0]:.0f}-{st[1]:.0f} token-steps (expected-pessimistic completion "
        f"lengths; {est['token_steps_without_stops']:.0f} if generation never stopped), "
        f"{est['prefill_tiles']} prefill tiles ({est['prompt_tokens']} prompt tokens, "
        f"{est['prompt_tokens_from']}). On a 2-core CPU:"
    )
    for c, v in est["cpu_classes"].items():
        here = "  <- this machine" if c == est["this_cpu"] else ""
        err.print(
            f"  {v['cpu']}: {v['minutes'][0]:.0f}-{v['minutes'][1]:.0f} min at {v['token_step_s']:g} s "
            f"per token-step ({v['minutes_without_stops']:.0f} min without stops){here}"
        )


def _run(
    kind: str,
    size: str,
    out: Path | None,
    engine: str,
    sets: list[str] | None,
    a: float | None,
    b: float | None,
    estimate_only: bool,
    json_out: bool,
    calibration_tokens: int | None = None,
    samples: int | None = None,
) -> None:
    from rich.console import Console

    from testbed.scenario import ScenarioError
    from testbed.study import fleet, paper
    from testbed.study.estimate import estimate
    from testbed.study.sizes import SIZES

    err = Console(stderr=True)
    if size not in SIZES:
        raise typer.BadParameter(f"expected one of {', '.join(SIZES)}, got {size!r}", param_hint="--size")
    if samples is not None and samples < 1:
        raise typer.BadParameter(f"expected >= 1, got {samples}", param_hint="--samples")
    if (a is None) != (b is None):
        raise typer.BadParameter("give both --a and --b (or neither: fit them in the calibration point)")
    if estimate_only:
        _print_estimate(estimate(kind, _with_samples(SIZES[size], samples)), json_out, err)
        return
    out = out or Path("runs") / f"reproduce-{kind}-{size}"
    fn = paper.run_paper if kind == "paper" else fleet.run_fleet
    sized = SIZES[size]
    if calibration_tokens is not None:  # more calibration tokens: a narrower interval (testbed.study.bootstrap)
        import dataclasses

        sized = dataclasses.replace(sized, calibration_tokens=calibration_tokens)
    try:
        result = fn(_with_samples(sized, samples), out, engine=engine, sets=_sets(sets), a=a, b=b)
    except ScenarioError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    err.print(f"report: {result.report}")
    if json_out:
        print(json.dumps({"report": str(result.report), "fit": result.fit.__dict__, "rows": result.rows}, indent=2))


_OUT = typer.Option(None, "--out", help="Study folder (default runs/reproduce-<kind>-<size>); rerun to resume.")
_ENGINE = typer.Option("local", "--engine", help="local (one process) or ray (run under ../shared/bin/offline).")
_SET = typer.Option(None, "--set", help="KEY=VALUE applied to every point, e.g. actors.verifier_device=cuda.")
_A = typer.Option(None, "--a", help="Pin the rejection model's slope (else: the calibration point's fit).")
_B = typer.Option(None, "--b", help="Pin the rejection model's intercept.")
_EST = typer.Option(False, "--estimate", help="Only print the estimated wall time on a 2-core CPU.")
_JSON = typer.Option(False, "--json", help="Print the table rows (or the estimate) as JSON.")
_CAL = typer.Option(
    None,
    "--calibration-tokens",
    min=1,
    help="Tokens per sequence of the calibration point (default: the size's); more narrows the "
    "fit's confidence interval.",
)
_SAMPLES = typer.Option(
    None,
    "--samples",
    help="Samples per problem (devices = problems x samples; unbiased pass@1); default: the size's (full: 5, else 1).",
)


@app.command("paper")
def paper(
    size: str = typer.Option("smoke", "--size", help=SIZE_HELP),
    out: Path = _OUT,
    engine: str = _ENGINE,
    sets: list[str] = _SET,
    a: float = _A,
    b: float = _B,
    estimate_only: bool = _EST,
    json_out: bool = _JSON,
    calibration_tokens: int = _CAL,
    samples: int = _SAMPLES,
) -> None:
    """The papers' setting (one device per HumanEval problem on the Shannon-rate uplink): every policy,
    the u_th and theta sweeps, calibration; one report next to the papers' headline numbers."""
    _run("paper", size, out, engine, sets, a, b, estimate_only, json_out, calibration_tokens, samples)


@app.command("sweep")
def sweep(
    out: Path = typer.Argument(..., help="A `reproduce paper` study folder (its points/)."),
    vocab: list[int] = typer.Option(
        [32000], "--vocab", min=2, help="|V| of the paper's accounting besides the run's own (repeatable)."
    ),
    json_out: bool = _JSON,
) -> None:
    """The channel sweep of a finished paper study, without re-running models: throughput over HLM's
    against the uplink rate, per payload encoding; where the paper's 206x lies. Writes
    OUT/report/channel_sweep.png and channel_sweep.json."""
    from rich.console import Console

    from testbed.study import sweep as channel_sweep
    from testbed.study.sizes import PAPER

    err = Console(stderr=True)
    try:
        doc = channel_sweep.sweep(out, vocabs=vocab, paper=PAPER["cu-hlm"])
    except channel_sweep.SweepError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    png, js = channel_sweep.write(out, doc)
    for line in channel_sweep.summary_lines(doc):
        err.print(line, highlight=False)
    err.print(f"figure: {png}; table: {js}")
    if json_out:
        print(json.dumps(doc, indent=2))


def _ints(value: str, option: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers (--sizes 1000,3000)."""
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise typer.BadParameter(f"expected positive integers separated by commas, got {value!r}", param_hint=option)
    return out


def _run_recorded(
    library: str,
    tiny_library: str,
    sizes: str,
    policies: str,
    devices_per_verifier: int,
    verifier_sweep_size: int | None,
    verifiers: str,
    out: Path | None,
    engine: str,
    json_out: bool,
) -> None:
    from rich.console import Console

    from testbed.content import LibraryError
    from testbed.scenario import ScenarioError
    from testbed.study.fleet_recorded import FleetRecordedError, Grid, run_fleet_recorded

    err = Console(stderr=True)
    fleet_sizes = _ints(sizes, "--sizes")
    grid = Grid(
        library=library,
        tiny_library=tiny_library,
        policies=tuple(p.strip() for p in policies.split(",") if p.strip()),
        sizes=fleet_sizes,
        devices_per_verifier=devices_per_verifier,
        verifier_sweep_size=verifier_sweep_size or min(10000, max(fleet_sizes)),
        verifiers=_ints(verifiers, "--verifiers"),
    )
    if not grid.policies:
        raise typer.BadParameter("expected at least one policy", param_hint="--policies")
    try:
        result = run_fleet_recorded(grid, out or Path("runs") / "reproduce-fleet-recorded", engine=engine)
    except (FleetRecordedError, LibraryError, ScenarioError) as e:
        err.print(f"[red]{e}[/red]", highlight=False)
        raise typer.Exit(2) from None
    err.print(f"report: {result.report}")
    if json_out:
        print(json.dumps({"report": str(result.report), "rows": result.rows}, indent=2))


@app.command("fleet")
def fleet(
    size: str = typer.Option("smoke", "--size", help=SIZE_HELP + " (--content models)"),
    out: Path = _OUT,
    engine: str = _ENGINE,
    sets: list[str] = _SET,
    a: float = _A,
    b: float = _B,
    estimate_only: bool = _EST,
    json_out: bool = _JSON,
    calibration_tokens: int = _CAL,
    content: str = typer.Option(
        "models",
        "--content",
        help="models: run the models at each fleet size (--size) | recorded: replay content libraries, "
        "no model (--library, --tiny-library, --sizes, ...)",
    ),
    library: str = typer.Option(
        "qwen2.5-coder-humaneval", "--library", help="Recorded content: the real models' library (name or folder)."
    ),
    tiny_library: str = typer.Option(
        "tiny-random", "--tiny-library", help="Recorded content: the tiny random models' library, drawn next to it."
    ),
    sizes: str = typer.Option("1000,3000,10000,30000,100000", "--sizes", help="Recorded content: fleet sizes."),
    policies: str = typer.Option(
        "llm-only,cu-hlm,cu-hlm-adaptive", "--policies", help="Recorded content: policy labels."
    ),
    devices_per_verifier: int = typer.Option(
        1000, "--devices-per-verifier", min=1, help="Recorded content: one verifier per this many devices."
    ),
    verifier_sweep_size: int = typer.Option(
        None,
        "--verifier-sweep-size",
        min=1,
        help="Recorded content: the fleet size of the verifier sweep (default 10000, or the largest of "
        "--sizes if smaller: a small grid stays small).",
    ),
    verifiers: str = typer.Option("1,2,5,10,20", "--verifiers", help="Recorded content: the verifier sweep."),
) -> None:
    """The same policies on heterogeneous fleets: system throughput, Jain fairness and verifier batch size
    vs fleet size. --content models runs the models (one verifier); --content recorded replays the content
    libraries (no model) against fleet size (1k-100k) and the number of verifiers, real content next to
    tiny random models'; with --engine ray (under ../shared/bin/offline) partitions replay in parallel."""
    if content == "recorded":
        models_only = {
            "--size": size != "smoke",
            "--set": bool(sets),
            "--a/--b": a is not None or b is not None,
            "--estimate": estimate_only,
            "--calibration-tokens": calibration_tokens is not None,
        }
        given = [name for name, on in models_only.items() if on]
        if given:
            raise typer.BadParameter(f"{', '.join(given)}: for --content models only (a replay runs no model)")
        _run_recorded(
            library,
            tiny_library,
            sizes,
            policies,
            devices_per_verifier,
            verifier_sweep_size,
            verifiers,
            out,
            engine,
            json_out,
        )
        return
    if content != "models":
        raise typer.BadParameter(f"expected models or recorded, got {content!r}", param_hint="--content")
    _run("fleet", size, out, engine, sets, a, b, estimate_only, json_out, calibration_tokens)
