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


@app.command("fleet")
def fleet(
    size: str = typer.Option("smoke", "--size", help=SIZE_HELP),
    out: Path = _OUT,
    engine: str = _ENGINE,
    sets: list[str] = _SET,
    a: float = _A,
    b: float = _B,
    estimate_only: bool = _EST,
    json_out: bool = _JSON,
    calibration_tokens: int = _CAL,
) -> None:
    """The same policies on heterogeneous fleets sharing one verifier: system throughput, Jain fairness
    and verifier batch size vs fleet size."""
    _run("fleet", size, out, engine, sets, a, b, estimate_only, json_out, calibration_tokens)
