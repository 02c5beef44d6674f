"""`testbed dashboards ...`: Prometheus/Grafana for live runs.

- ``export DIR``: write the provisioning tree (dashboards JSON, Grafana provisioning,
  prometheus.yml, docker-compose.yml); ``export grafana`` refreshes the committed copy.
- ``up``: start the installed ``prometheus`` binary scraping a run's exporter and print the URLs.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import typer

from testbed import dashboards as D
from testbed.metrics import DEFAULT_METRICS_PORT

app = typer.Typer(no_args_is_help=True)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy

MISSING_PROMETHEUS = """\
Prometheus is not installed (no `prometheus` on PATH).
  Debian/Ubuntu:  sudo apt-get install prometheus        (gives prometheus and promtool)
  Elsewhere:      https://prometheus.io/download/ (put the `prometheus` binary on PATH)
  With Docker:    docker compose -f grafana/docker-compose.yml up   (Prometheus + Grafana)
Then run `testbed dashboards up` again."""


@app.command("export")
def export(out_dir: Path = typer.Argument(..., help="Directory to write the provisioning tree into.")) -> None:
    """Write dashboards JSON, Grafana provisioning, prometheus.yml and docker-compose.yml under DIR."""
    paths = D.export(out_dir)
    for p in paths:
        typer.echo(str(p))


@app.command("up")
def up(
    target: list[str] = typer.Option(
        [f"127.0.0.1:{DEFAULT_METRICS_PORT}"],
        "--target",
        "-t",
        help="host:port of a run's metrics exporter (repeatable).",
    ),
    port: int = typer.Option(D.PROMETHEUS_PORT, help="Port Prometheus listens on (127.0.0.1)."),
    scrape_interval: str = typer.Option(D.SCRAPE_INTERVAL, help="Prometheus scrape interval, e.g. 1s."),
    data_dir: Path | None = typer.Option(None, help="Config and TSDB directory (default: a temporary one)."),
    prometheus: str = typer.Option("prometheus", help="Prometheus binary."),
) -> None:
    """Start a local Prometheus scraping the run and print the URLs (Ctrl-C stops it)."""
    binary = shutil.which(prometheus)
    if binary is None:
        typer.echo(MISSING_PROMETHEUS, err=True)
        raise typer.Exit(1)
    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hlm-prometheus-")
        data_dir = Path(tmp.name)
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "prometheus.yml"
    config.write_text(D.prometheus_config(target, scrape_interval))
    listen = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data_dir / 'tsdb'}",
            f"--web.listen-address={listen}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://{listen}"
        if not _wait_ready(base, proc, timeout=30):
            err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
            typer.echo(f"Prometheus did not become ready on {listen}.\n{err}", err=True)
            raise typer.Exit(1)
        typer.echo(f"Prometheus ready: {base}  (scraping {', '.join(target)} every {scrape_interval})")
        typer.echo(f"  targets: {base}/targets")
        typer.echo(f"  query:   {base}/graph?g0.expr=hlm_tokens_committed_total")
        typer.echo(f"  config:  {config}")
        typer.echo(
            "Grafana (not started here): docker compose -f grafana/docker-compose.yml up grafana, or import "
            f"grafana/dashboards/*.json with a Prometheus data source at {base}"
        )
        typer.echo("Ctrl-C stops Prometheus.")
        sys.stdout.flush()
        while proc.poll() is None:
            time.sleep(0.5)
        typer.echo(f"Prometheus exited with code {proc.returncode}", err=True)
        raise typer.Exit(proc.returncode or 1)
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp is not None:
            tmp.cleanup()


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with _OPENER.open(f"{base}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False
