from __future__ import annotations

import json
from pathlib import Path

import typer


def calibrate(
    pair: str = typer.Option("qwen2.5-coder", "--pair", help="Bundled pair name or tiny."),
    prompts: str = typer.Option("humaneval", "--prompts", help="humaneval, or a JSONL file of {prompt: ...}."),
    n_prompts: int = typer.Option(8, "--n-prompts", min=1),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1),
    temperature: float = typer.Option(1.0, "--temperature", min=1e-6),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("runs/calibration"), "--out"),
    json_out: bool = typer.Option(False, "--json", help="Print the fits as JSON."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | bfloat16 | float32 | float16 (tiny pairs: float32)."),
) -> None:
    """Fit the rejection model beta ~ a*u + b per uncertainty estimator on a model pair."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from agents.models import load_tokenizer, pair_specs
    from testbed import calibrate as cal
    from testbed.prompts import load_prompts

    err = Console(stderr=True)
    slm, llm = pair_specs(pair)
    spec = (
        {"source": "humaneval", "count": n_prompts} if prompts == "humaneval" else {"file": prompts, "count": n_prompts}
    )
    texts = load_prompts(spec, load_tokenizer(slm))
    total = n_prompts * max_new_tokens
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("calibrating (hlm, every draft verified)", total=total)
        result = cal.calibrate(
            slm,
            llm,
            [list(p.token_ids) for p in texts],
            max_new_tokens,
            temperature,
            seed,
            progress=lambda g, v: bar.update(task, completed=sum(len(d.rows) for d in g.devices.values())),
            dtype=dtype,
        )
    out.mkdir(parents=True, exist_ok=True)
    result.samples.to_csv(out / "samples.csv", index=False)
    cal.plot(result, out / "beta_vs_u.png")
    doc = {
        "pair": pair,
        "n_prompts": n_prompts,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "estimators": result.fits,
    }
    (out / "calibration.json").write_text(json.dumps(doc, indent=2))
    table = Table(title=f"beta ~ a*u + b on {pair} ({len(result.samples)} tokens)  -> {out}")
    for col in ("estimator", "a", "b", "pearson r", "u_th risk-averse (-b/a)", "u_th 95% CI (bootstrap)"):
        table.add_column(col, justify="right")
    for name, f in result.fits.items():
        fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        ci = (f.get("ci") or {}).get("u_th_risk_averse")
        ci_text = (
            "n/a" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]" + (" straddles 0" if f["ci"]["straddles_zero"] else "")
        )
        table.add_row(name, fmt(f["a"]), fmt(f["b"]), fmt(f["pearson_r"]), fmt(f["u_th_risk_averse"]), ci_text)
    err.print(table)
    if json_out:
        print(json.dumps(doc, indent=2))
