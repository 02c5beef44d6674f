"""`testbed links`: the bundled link profiles; `testbed links plot`: one profile over time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=False, invoke_without_command=True)


@app.callback(invoke_without_command=True)
def links(ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the named link profiles with their parameters (scenario units)."""
    if ctx.invoked_subcommand is not None:
        return
    import netem

    profiles = netem.list_profiles()
    if json_out:
        out = {
            name: {**p.to_dict(), "summary": {"uplink": p.uplink.summary(), "downlink": p.downlink.summary()}}
            for name, p in profiles.items()
        }
        typer.echo(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Link profiles (uplink = device -> verifier)")
    for col in ("name", "uplink", "downlink", "about"):
        table.add_column(col, overflow="fold")
    for name, p in profiles.items():
        table.add_row(name, p.uplink.summary(), p.downlink.summary(), p.description)
    Console().print(table)


def timeline(profile, seed: int, seconds: float, probes: int = 1000, probe_bytes: int = 100) -> dict:
    """Rate in force and the one-way delay of small probes over [0, seconds)."""
    import netem

    link = netem.Link(profile, seed)
    grid = [seconds * i / 2000 for i in range(2000)]
    rate = [link.conditions_at(t)[0] for t in grid]
    sent = [seconds * i / probes for i in range(probes)]
    delay = []
    for t in sent:
        a = link.send(probe_bytes, t)
        delay.append(None if a is None else a - t)
    return {"t": grid, "rate_bps": rate, "probe_t": sent, "probe_delay_s": delay}


@app.command("plot")
def plot(
    name: str = typer.Argument(..., help="Profile name (see `testbed links`)."),
    seconds: float = typer.Option(10.0, "--seconds", min=0.001, help="Emulated seconds to show."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    seed: int = typer.Option(0, "--seed", help="Scenario seed (device 0's links are shown)."),
) -> None:
    """Rate and one-way delay of profile NAME over time, both directions, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import netem

    try:
        profile = netem.get_profile(name)
    except KeyError as e:
        raise typer.BadParameter(str(e.args[0]), param_hint="NAME") from None
    fig, (ax_rate, ax_delay) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    for direction, color in (("uplink", "tab:blue"), ("downlink", "tab:orange")):
        tl = timeline(profile.direction(direction), netem.link_seed(seed, 0, direction), seconds)
        rates = [r / 1e6 if math.isfinite(r) else float("nan") for r in tl["rate_bps"]]
        ax_rate.step(tl["t"], rates, where="post", color=color, label=direction)
        ok = [(t, d * 1e3) for t, d in zip(tl["probe_t"], tl["probe_delay_s"]) if d is not None]
        lost = [t for t, d in zip(tl["probe_t"], tl["probe_delay_s"]) if d is None]
        if ok:
            ax_delay.plot(*zip(*ok), ".", ms=2, color=color, label=f"{direction} probe delay")
        if lost:
            ax_delay.plot(lost, [0] * len(lost), "x", ms=4, color=color, label=f"{direction} lost ({len(lost)})")
    ax_rate.set_ylabel("rate (Mbit/s)")
    if all(not p.varies and not math.isfinite(p.rate_bps) for p in (profile.uplink, profile.downlink)):
        ax_rate.text(0.5, 0.5, "unlimited rate", transform=ax_rate.transAxes, ha="center")
    ax_delay.set_ylabel("one-way delay of 100 B probes (ms)")
    ax_delay.set_xlabel("emulated time (s)")
    ax_rate.legend(loc="upper right")
    ax_delay.legend(loc="upper right", fontsize="small")
    fig.suptitle(f"{name}: {profile.description}", fontsize="medium")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    typer.echo(f"wrote {out}")
