"""The channel sweep: where the CU-HLM paper's "up to 206x HLM's throughput" lies (issue 15, item 6;
docs/design.md section 7, channel sweep).

No model is re-run. Token content never depends on timing, so a point's tokens.parquet (per token:
transmitted or skipped, the bytes it put on each link, k) plus the paper study's per-token delay
model gives its throughput at any uplink rate R (testbed.study.scenarios, isolate_devices):

    skipped token:      slm
    transmitted token:  slm + up_bits / R + d_up + down_bits / R_down + d_down + llm

(slm = 0 for llm-only, which drafts nothing; llm is the LLM's batch-1 verification, which the
study charges on the downlink delay, so d_down below already holds it.) A device's tokens are
sequential, so the study's throughput of a point is every device's tokens over the sum of their
delays (testbed.study.analysis.paper_throughput: devices stop at different lengths, so this is not the mean
of the devices' throughputs). Summed over all N tokens, the delays are F N + W N / R (F seconds per
token that do not depend on R, W uplink bits per token), so

    throughput(R) = 1 / (F + W / R)

and the ratio of two points, cu-hlm over hlm, is (F_hlm + W_hlm / R) / (F_cu + W_cu / R): a ratio of
two affine functions of 1/R, hence monotone in R. Its two ends:

- R -> 0, the upload dominates: W_hlm / W_cu, the payload ratio adjusted for skipping (in the paper's
  accounting and equal token counts, 1 / ((1 - skip) (1 - compression)) exactly);
- R -> infinity, compute and fixed delays dominate: F_hlm / F_cu = (slm + c) / (slm + (1 - skip) c)
  with c = d_up + d_down + llm + down_bits / R_down; 1 when nothing is skipped.

So the ratio's maximum is its low-rate limit: it is approached, never exceeded, as the uplink gets
slower. The rate at which it reaches a target r solves (F_h + W_h/R) = r (F_c + W_c/R):
R = (W_h - r W_c) / (r F_c - F_h), when that is positive.

Payload encodings (what up_bits holds for a transmitted token):
- "ours": the bytes the run put on the uplink (uplink_bytes: frame header, piggybacked ids, and the
  payload: float32 dense for hlm, 608 KB at Qwen's |V| = 151,936).
- "paper": the paper's accounting, the payload alone: agents.codec.paper_bits(k, |V|) =
  k (8 + ceil(log2 |V|)) bits, k = |V| for hlm's full distribution. |V| is an option (`vocab`) so
  the paper's Llama vocabulary (32,000) can be compared with Qwen's: a full distribution (k = |V| of
  the run) becomes k = vocab, a truncated one keeps its k (top-k*(t) covers a probability mass, which
  depends on how peaked x is, not on |V|), capped at vocab.
The downlink (the verdict) is charged as measured in every encoding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PAPER_VOCAB = 32_000  # Llama-2's vocabulary (the paper's TinyLlama / Llama-2 pair)
PAPER_PROB_BITS = 8  # the paper's b_prob
RATES_BPS = tuple(float(r) for r in np.logspace(3, 10, 71))  # 1 kbit/s .. 10 Gbit/s
TARGET = 206.0  # CU-HLM's headline, "up to 206x HLM"
SKIP_POLICIES = ("u-hlm", "cu-hlm", "cu-hlm-offline", "cu-hlm-adaptive", "rand-hlm")


class SweepError(ValueError):
    """A study or a point the sweep cannot model exactly (names what and where)."""


@dataclass(frozen=True)
class DelayModel:
    """The study's per-token delay model, read from a point's resolved scenario (isolated devices)."""

    slm_s: float
    uplink_rate_bps: float
    uplink_delay_s: float
    downlink_rate_bps: float
    downlink_delay_s: float  # the LLM's step included (isolate_devices puts it there)
    uplink_overhead_bytes: int = 0  # per packet
    downlink_overhead_bytes: int = 0
    mtu: int = 1500
    downlink_mtu: int = 1500

    @classmethod
    def from_scenario(cls, s, where: str = "scenario") -> DelayModel:
        from testbed.config.devices import resolve_link

        if len(s.tiers) != 1:
            raise SweepError(f"{where}: the sweep models the paper study's single tier, got {len(s.tiers)} tiers")
        t = s.tiers[0]
        link = resolve_link(t.link)
        up, down = link.uplink, link.downlink
        v = s.server.verify_ms
        if v.base or v.per_token or v.per_sequence or s.server.max_wait_ms:
            raise SweepError(
                f"{where}: the verifier takes time (verify_ms {v}); the sweep needs the study's "
                f"isolated devices (testbed.study.scenarios.isolate_devices)"
            )
        return cls(
            t.slm_ms_per_token / 1000.0,
            _static_rate(up, f"{where}: uplink"),
            up.delay_s,
            _static_rate(down, f"{where}: downlink"),
            down.delay_s,
            up.overhead_bytes,
            down.overhead_bytes,
            up.mtu,
            down.mtu,
        )


def _static_rate(p, where: str) -> float:
    """The constant rate of a link with nothing random on it (else the delay model is not exact)."""
    random = {k: getattr(p, k) for k in ("jitter_s", "loss", "ge_p", "duplicate") if getattr(p, k)}
    if p.trace is not None:
        random["trace"] = p.trace.source
    if p.channel is not None and p.channel.fading != "none":
        random["fading"] = p.channel.fading
    if random:
        raise SweepError(f"{where}: the delay model needs a static link, this one has {random}")
    return p.channel.awgn_rate_bps() if p.channel is not None else float(p.rate_bps)


def _wire(nbytes: np.ndarray, mtu: int, overhead: int) -> np.ndarray:
    """Bytes a message occupies on a link: the message plus the overhead of each of its packets."""
    return nbytes + overhead * np.maximum(1, -(-nbytes // mtu))


@dataclass(frozen=True)
class Encoding:
    """How a transmitted token's uplink bits are counted (module docstring)."""

    kind: str  # "ours" | "paper"
    vocab: int | None = None  # paper: |V| of the accounting (None: the run's own)

    def label(self, run_vocab: int) -> str:
        if self.kind == "ours":
            return "ours (bytes sent: float32 dense for hlm)"
        return f"paper accounting, |V| = {self.vocab or run_vocab:,}"

    def key(self, run_vocab: int) -> str:
        return "ours" if self.kind == "ours" else f"paper-V{self.vocab or run_vocab}"


def uplink_bits(tokens, enc: Encoding, run_vocab: int, model: DelayModel) -> np.ndarray:
    """Bits each transmitted token puts on the uplink under `enc` (0 for skipped tokens)."""
    from agents.codec import paper_bits

    tx = tokens["transmitted"].to_numpy(bool)
    if enc.kind == "ours":
        up = tokens["uplink_bytes"].to_numpy(np.int64)
        return np.where(tx, 8.0 * _wire(up, model.mtu, model.uplink_overhead_bytes), 0.0)
    if enc.kind != "paper":
        raise SweepError(f"encoding: expected 'ours' or 'paper', got {enc.kind!r}")
    V = int(enc.vocab or run_vocab)
    k = tokens["k"].to_numpy(np.int64)
    k_acc = np.where(k >= run_vocab, V, np.minimum(k, V))
    ks, inv = np.unique(k_acc, return_inverse=True)
    bits = np.array([paper_bits(int(kk), V, PAPER_PROB_BITS) for kk in ks], float)[inv.ravel()]
    return np.where(tx, bits, 0.0)


@dataclass(frozen=True)
class Affine:
    """A point's throughput(R) = 1 / (F + W / R) (module docstring)."""

    F: float  # seconds per token, mean over every token of every device, independent of R
    W: float  # uplink bits per token (likewise)
    devices: int

    def throughput(self, rate_bps) -> np.ndarray:
        r = np.asarray(rate_bps, float)
        return 1.0 / (self.F + self.W / r)


def affine(tokens, model: DelayModel, enc: Encoding, run_vocab: int) -> Affine:
    """Reduce a point's tokens to (F, W)."""
    if not len(tokens):
        raise SweepError("tokens: the point has no tokens")
    tx = tokens["transmitted"].to_numpy(bool)
    drafts = tokens["draft_id"].to_numpy(np.int64) >= 0
    down = _wire(tokens["downlink_bytes"].to_numpy(np.int64), model.downlink_mtu, model.downlink_overhead_bytes)
    fixed = np.where(drafts, model.slm_s, 0.0) + np.where(
        tx, model.uplink_delay_s + 8.0 * down / model.downlink_rate_bps + model.downlink_delay_s, 0.0
    )
    bits = uplink_bits(tokens, enc, run_vocab, model)
    return Affine(float(fixed.mean()), float(bits.mean()), int(np.unique(tokens["device"].to_numpy()).size))


def device_throughputs(
    tokens, model: DelayModel, rate_bps: float, enc: Encoding = Encoding("ours"), run_vocab: int = 0
) -> dict[int, float]:
    """Per device: tokens / sum of the model's per-token delays at uplink rate `rate_bps`."""
    out = {}
    for d, g in tokens.groupby("device", sort=True):
        a = affine(g, model, enc, run_vocab or int(g["k"].max()))
        out[int(d)] = float(a.throughput(rate_bps))
    return out


def rate_reaching(h: Affine, c: Affine, target: float) -> float | None:
    """The highest uplink rate at which c's throughput is >= target x h's (None if at no rate)."""
    num = h.W - target * c.W
    den = target * c.F - h.F
    # ratio >= target  <=>  num / R >= den (both sides over 1/R > 0)
    if den < 0 or (den == 0 and num >= 0):  # the high-rate limit reaches it: up to R -> infinity
        return math.inf
    return num / den if num > 0 else None


def ratio(h: Affine, c: Affine, rate_bps) -> np.ndarray:
    return c.throughput(rate_bps) / h.throughput(rate_bps)


def limits(h: Affine, c: Affine) -> tuple[float, float]:
    """(R -> 0, R -> infinity) limits of c's throughput over h's."""
    low = math.inf if c.W == 0 else h.W / c.W
    return low, h.F / c.F


# --------------------------------------------------------------------------------------------- a study


@dataclass
class PointData:
    name: str
    policy: str
    tokens: object  # pandas DataFrame
    summary: dict
    model: DelayModel


def load_points(out: Path, only: Sequence[str] | None = None) -> dict[str, PointData]:
    """Every finished point of a paper study directory (points/*/ with tokens, summary and scenario), or
    only those named."""
    import pandas as pd

    from testbed.config.io import load_scenario

    pts = {}
    root = Path(out) / "points"
    if not root.is_dir():
        raise SweepError(f"{out}: no points/ folder (run `testbed reproduce paper --out {out}` first)")
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        need = [d / "tokens.parquet", d / "summary.json", d / "scenario.yaml"]
        if (only is not None and d.name not in only) or not all(f.exists() for f in need):
            continue
        s = load_scenario(d / "scenario.yaml")
        pol = s.tiers[0].policy
        name = (
            pol
            if isinstance(pol, str)
            else pol.get("name", "?")
            if isinstance(pol, dict)
            else getattr(pol, "name", "?")
        )
        cols = ["device", "transmitted", "draft_id", "k", "uplink_bytes", "downlink_bytes", "payload_bytes"]
        pts[d.name] = PointData(
            d.name,
            str(name),
            pd.read_parquet(d / "tokens.parquet", columns=cols),
            json.loads((d / "summary.json").read_text(encoding="utf-8")),
            DelayModel.from_scenario(s, str(d / "scenario.yaml")),
        )
    if "hlm" not in pts:
        raise SweepError(f"{out}: the sweep needs the hlm point (points/hlm)")
    return pts


def encodings(run_vocab: int, vocabs: Sequence[int] = (PAPER_VOCAB,)) -> list[Encoding]:
    return [Encoding("ours"), Encoding("paper")] + [Encoding("paper", v) for v in vocabs if v != run_vocab]


def paper_curve(model: DelayModel, skip: float, compression: float, vocab: int = PAPER_VOCAB):
    """hlm and cu-hlm as (F, W) from the paper's headline skip rate and compression alone, in its
    accounting, with this study's compute and fixed delays (one device, one token): what the paper's
    own numbers allow on our delay model."""
    from agents.codec import index_bits

    c = model.uplink_delay_s + model.downlink_delay_s
    bits = vocab * (PAPER_PROB_BITS + index_bits(vocab))
    return (
        Affine(model.slm_s + c, bits, 1),
        Affine(model.slm_s + (1 - skip) * c, (1 - skip) * (1 - compression) * bits, 1),
    )


def sweep(
    out: Path,
    vocabs: Sequence[int] = (PAPER_VOCAB,),
    rates: Sequence[float] = RATES_BPS,
    target: float = TARGET,
    paper: dict | None = None,
    only: Sequence[str] | None = None,
) -> dict:
    """The sweep of a paper study directory: every skipping point (or those in `only`) against hlm, per
    encoding; JSON-able."""
    pts = load_points(out, only)
    h = pts["hlm"]
    run_vocab = int(h.summary.get("vocab_size") or h.tokens["k"].max())
    model = h.model
    for p in pts.values():
        if p.model != model:
            raise SweepError(f"{out}/points/{p.name}: its delay model differs from hlm's ({p.model} vs {model})")
    study_rate = model.uplink_rate_bps
    rates = np.asarray(sorted(set(rates) | {study_rate}), float)
    others = [p for p in pts.values() if p.policy in SKIP_POLICIES and (p.summary.get("skip_rate") or 0.0) < 1.0]
    doc: dict = {
        "rates_bps": rates.tolist(),
        "study_rate_bps": study_rate,
        "target": target,
        "run_vocab": run_vocab,
        "model": asdict(model),
        "encodings": {},
        "points": {},
    }
    for enc in encodings(run_vocab, vocabs):
        key = enc.key(run_vocab)
        ah = affine(h.tokens, model, enc, run_vocab)
        e = {
            "label": enc.label(run_vocab),
            "hlm_bits_per_token": ah.W,
            "hlm_throughput": ah.throughput(rates).tolist(),
            "curves": {},
            "rows": [],
        }
        for p in others:
            ac = affine(p.tokens, model, enc, run_vocab)
            low, high = limits(ah, ac)
            r = ratio(ah, ac, rates)
            reach = rate_reaching(ah, ac, target)
            e["curves"][p.name] = r.tolist()
            e["rows"].append(
                {
                    "point": p.name,
                    "policy": p.policy,
                    "skip_rate": p.summary.get("skip_rate"),
                    "vocab_compression": p.summary.get("vocab_compression"),
                    "bits_per_token": ac.W,
                    "ratio_at_study_rate": float(ratio(ah, ac, study_rate)),
                    "ratio_low_rate_limit": low,
                    "ratio_high_rate_limit": high,
                    "max_ratio": max(low, high),
                    "max_at": "R -> 0" if low >= high else "R -> infinity",
                    "rate_reaching_target_bps": reach,
                    "reaches_target": reach is not None,
                }
            )
        doc["encodings"][key] = e
    pp = paper or {}
    if pp.get("skip_rate") is not None and pp.get("vocab_compression") is not None:
        ph, pc = paper_curve(model, pp["skip_rate"], pp["vocab_compression"])
        low, high = limits(ph, pc)
        doc["paper_numbers"] = {
            "skip_rate": pp["skip_rate"],
            "vocab_compression": pp["vocab_compression"],
            "throughput_ratio_hlm": pp.get("throughput_ratio_hlm"),
            "vocab": PAPER_VOCAB,
            "curve": ratio(ph, pc, rates).tolist(),
            "ratio_low_rate_limit": low,
            "ratio_high_rate_limit": high,
            "rate_reaching_target_bps": rate_reaching(ph, pc, target),
        }
    return _finite(doc)


def _finite(x):
    """JSON without Infinity: an infinite rate or limit is written "inf"."""
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def headline(doc: dict, point: str = "cu-hlm") -> list[dict]:
    """Per encoding: the named point's row and the best skipping point's (highest low-rate limit)."""
    out = []
    for key, e in doc["encodings"].items():
        rows = e["rows"]
        mine = next((r for r in rows if r["point"] == point), None)
        best = max(rows, key=lambda r: r["max_ratio"], default=None)
        out.append({"encoding": key, "label": e["label"], "point": mine, "best": best})
    return out


def _rate_text(r: float | None) -> str:
    if r is None:
        return "never"
    if r == "inf" or (isinstance(r, float) and math.isinf(r)):
        return "any rate (the high-rate limit reaches it)"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if r >= scale:
            return f"{r / scale:.3g} {unit}"
    return f"{r:.3g} bit/s"


def summary_lines(doc: dict) -> list[str]:
    """Plain-text findings (CLI and report)."""
    t = doc["target"]
    lines = [
        f"study uplink rate {_rate_text(doc['study_rate_bps'])} (W log2(1 + SNR)); |V| of the run {doc['run_vocab']:,}"
    ]
    for h in headline(doc):
        for tag, r in (("cu-hlm (risk-averse)", h["point"]), ("best skipping point", h["best"])):
            if r is None:
                continue
            where = (
                f"reaches {t:g}x below {_rate_text(r['rate_reaching_target_bps'])}"
                if r["reaches_target"]
                else f"never reaches {t:g}x: at most {r['max_ratio']:.3g}x ({r['max_at']})"
            )
            lines.append(
                f"{h['label']}: {tag} {r['point']}: {r['ratio_at_study_rate']:.3g}x at the study's rate, "
                f"{where}; skip {100 * (r['skip_rate'] or 0):.1f}%, compression "
                f"{100 * (r['vocab_compression'] or 0):.1f}%"
            )
    p = doc.get("paper_numbers")
    if p:
        lines.append(
            f"paper's own skip {100 * p['skip_rate']:.1f}% and compression "
            f"{100 * p['vocab_compression']:.1f}% "
            f"(|V| = {p['vocab']:,}) on this delay model: at most {p['ratio_low_rate_limit']:.3g}x "
            f"(= 1 / ((1 - skip)(1 - compression)), as R -> 0); "
            f"{'reaches' if p['rate_reaching_target_bps'] is not None else 'never reaches'} "
            f"{t:g}x"
        )
    return lines


def plot(doc: dict, path: Path, point: str = "cu-hlm") -> Path:
    """Left: throughput ratio over hlm against uplink rate, per encoding (the named point solid, the best
    skipping point dashed), the paper's numbers dotted; right: hlm's and the point's throughput."""
    from testbed.report import new_figure

    fig, ax = new_figure(13, 4.8, ncols=2)
    left, right = ax[0]
    rates = np.asarray(doc["rates_bps"], float)
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
    for i, e in enumerate(doc["encodings"].values()):
        c = colors[i % len(colors)]
        best = max(e["rows"], key=lambda r: r["max_ratio"], default=None)
        if point in e["curves"]:
            left.plot(rates, e["curves"][point], color=c, lw=2, label=f"{point}: {e['label']}")
            hlm = np.asarray(e["hlm_throughput"], float)
            right.plot(rates, hlm, color=c, ls="--", lw=1.2, label=f"hlm: {e['label']}")
            right.plot(rates, hlm * np.asarray(e["curves"][point]), color=c, lw=2, label=f"{point} (same encoding)")
            at = next(r for r in e["rows"] if r["point"] == point)
            left.scatter([doc["study_rate_bps"]], [at["ratio_at_study_rate"]], color=c, zorder=3, s=18)
        if best is not None and best["point"] != point:
            left.plot(
                rates, e["curves"][best["point"]], color=c, ls="--", lw=1, label=f"{best['point']} (highest ceiling)"
            )
    p = doc.get("paper_numbers")
    if p:
        left.plot(
            rates,
            p["curve"],
            color="k",
            ls=":",
            lw=1.5,
            label=f"paper's skip {100 * p['skip_rate']:.1f}% / compression {100 * p['vocab_compression']:.1f}%, "
            f"|V| {p['vocab']:,}",
        )
    left.axhline(doc["target"], color="gray", lw=1, ls="-.", label=f"paper: up to {doc['target']:g}x")
    for a in (left, right):
        a.axvline(doc["study_rate_bps"], color="k", lw=0.8, alpha=0.5)
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("uplink rate (bit/s); vertical line: the study's W log2(1 + SNR)")
    left.set_ylabel("token throughput / hlm's")
    left.set_title("Throughput ratio to HLM vs uplink rate")
    right.set_ylabel("token throughput (tokens/s)")
    right.set_title("hlm and cu-hlm throughput vs uplink rate")
    left.legend(fontsize=6.5, loc="upper right")
    right.legend(fontsize=6.5, loc="lower right")
    fig.savefig(path)
    return path


CAPTION = (
    "Throughput over HLM's against the uplink rate, from each point's recorded tokens and the study's "
    "per-token delay model (no model re-run; the curves pass through the measured ratio at the study's "
    "rate, the vertical line). Each curve is (F_hlm + W_hlm/R) / (F_cu + W_cu/R): monotone in R, so its "
    "maximum is its low-rate limit. At low rates the upload dominates and the ratio tends to the payload "
    "ratio adjusted for skipping (hlm's bits per token over cu-hlm's, skipped tokens counting 0); at high "
    "rates compute and fixed delays dominate and it falls to (slm + c) / (slm + (1 - skip) c), c the "
    "transmitted token's LLM step and link delays: 1 when nothing is skipped. Encodings: ours (the bytes "
    "sent; hlm's float32 dense distribution) and the paper's accounting k (8 + ceil(log2 |V|)) bits, at "
    "Qwen's |V| and at the paper's 32,000. Dotted: the paper's own skip rate and compression on our "
    "delay model."
)


def write(out: Path, doc: dict, report_dir: Path | None = None) -> tuple[Path, Path]:
    """channel_sweep.png and channel_sweep.json into report_dir (default OUT/report)."""
    rep = Path(report_dir or Path(out) / "report")
    rep.mkdir(parents=True, exist_ok=True)
    js = rep / "channel_sweep.json"
    js.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return plot(doc, rep / "channel_sweep.png"), js


def _x(v) -> str:
    return "inf" if isinstance(v, str) else f"{v:.4g}x"


def html_section(doc: dict, figure: Path | None = None) -> list[str]:
    """The report's section: findings, one table per encoding, the figure."""
    import html as H

    from testbed.report import format_value, html_figure, html_table

    parts = [
        "<h2>Channel sweep: where the paper's 206x lies</h2>",
        "<ul>" + "".join(f"<li>{H.escape(line)}</li>" for line in summary_lines(doc)) + "</ul>",
    ]
    for e in doc["encodings"].values():
        rows = sorted(e["rows"], key=lambda r: -r["max_ratio"])
        parts.append(
            f"<h3>{H.escape(e['label'])}: hlm {format_value(e['hlm_bits_per_token'] / 8, 'bytes')} per token</h3>"
        )
        parts.append(
            html_table(
                [
                    "point",
                    "skip",
                    "compression",
                    "uplink / token",
                    "ratio at study rate",
                    "ratio R -> 0",
                    "ratio R -> inf",
                    f"reaches {doc['target']:g}x below",
                ],
                [
                    [
                        r["point"],
                        format_value(r["skip_rate"], "pct", missing="n/a"),
                        format_value(r["vocab_compression"], "pct", missing="n/a"),
                        format_value(r["bits_per_token"] / 8, "bytes"),
                        f"{r['ratio_at_study_rate']:.3g}x",
                        _x(r["ratio_low_rate_limit"]),
                        _x(r["ratio_high_rate_limit"]),
                        _rate_text(r["rate_reaching_target_bps"]),
                    ]
                    for r in rows
                ],
            )
        )
    if figure is not None:
        parts.append(html_figure(figure, CAPTION))
    return parts
