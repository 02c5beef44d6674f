"""testbed.report's tests: run directories fabricated by `make_synthetic_run` (a realistic
tokens.parquet + summary.json + scenario.yaml in the results schema), given to a test by the
`make_run` fixture."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

V = 151936
TIERS = {  # name: (slm s/token, uplink bit/s, one-way delay s)
    "phone": (0.030, 2e6, 0.020),
    "laptop": (0.012, 20e6, 0.005),
}


def make_synthetic_run(
    out: Path,
    *,
    policies: dict[str, str] | None = None,
    devices: dict[str, int] | None = None,
    tokens_per_device: int = 48,
    seed: int = 0,
    name: str = "synthetic",
) -> Path:
    """Fabricate a run directory: tokens.parquet (results schema), summary.json, scenario.yaml."""
    policies = policies or {"phone": "cu-hlm", "laptop": "u-hlm"}
    devices = devices or {"phone": 6, "laptop": 3}
    rng = np.random.default_rng(seed)
    rows = []
    batches = []
    dev = 0
    for tier, n in devices.items():
        slm, rate, delay = TIERS.get(tier, TIERS["phone"])
        policy = policies[tier]
        for _ in range(n):
            t = float(rng.uniform(0, 0.05))
            for i in range(tokens_per_device):
                u = float(np.clip(rng.beta(0.7, 1.6), 0, 1) * 20 // 1 / 20)
                beta = float(np.clip(0.8 * u - 0.07 + rng.normal(0, 0.06), 0, 1))
                skip = {"hlm": False, "rand-hlm": rng.random() < 0.3}.get(policy, u <= 0.081)
                if policy == "slm-only":
                    skip = True
                tx = not skip
                k = (int(min(V, max(1, rng.lognormal(4.0, 1.0)))) if policy.startswith("cu-hlm") else V) if tx else 0
                payload = math.ceil(k * 26 / 8) if tx else 0
                retx = int(tx and rng.random() < 0.03)
                uplink = (payload + 24) * (1 + retx) if tx else 0
                start = t
                sent = start + slm
                if tx:
                    wait = float(rng.exponential(0.004))
                    verdict = sent + uplink * 8 / rate + 2 * delay + wait + 0.025
                    batches.append(int(rng.integers(1, 9)))
                    accepted = bool(rng.random() >= beta)
                else:
                    verdict = math.nan
                    accepted = True
                commit = verdict if tx else sent
                rows.append(
                    dict(
                        device=dev,
                        tier=tier,
                        policy=policy,
                        prompt_index=i // 24,
                        token_index=i,
                        token_id=int(rng.integers(0, V)),
                        draft_id=int(rng.integers(0, V)),
                        uncertainty=u,
                        transmitted=tx,
                        k=k,
                        prob_bits=8 if tx else 0,
                        payload_bytes=payload,
                        uplink_bytes=uplink,
                        accepted=accepted,
                        resampled=tx and not accepted,
                        beta=beta,
                        beta_is_shadow=not tx,
                        retransmissions=retx,
                        t_draft_start=start,
                        t_upload_sent=sent if tx else math.nan,
                        t_verdict=verdict,
                        t_commit=commit,
                    )
                )
                t = commit
            dev += 1
    df = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    # as testbed.results writes it: NaN is a value ("not applicable"), never a null
    pq.write_table(
        pa.Table.from_arrays(
            [pa.array(df[c].to_numpy(), from_pandas=False) for c in df.columns], names=list(df.columns)
        ),
        out / "tokens.parquet",
    )
    emu = float(df["t_commit"].max())

    def figures(d: pd.DataFrame) -> dict:
        tx = d["transmitted"].to_numpy()
        lat = (d["t_commit"] - d["t_draft_start"]).to_numpy()
        up = int(tx.sum())
        return {
            "tokens": len(d),
            "skip_rate": float(1 - tx.mean()),
            "acceptance_rate": float(d["accepted"][tx].mean()) if up else None,
            "vocab_compression": float(1 - d["k"][tx].sum() / (V * up)) if up else None,
            "uplink_bytes": int(d["uplink_bytes"].sum()),
            "uplink_bytes_per_token": float(d["uplink_bytes"].mean()),
            "payload_bytes": int(d["payload_bytes"].sum()),
            "uploads": up,
            "retransmissions": int(d["retransmissions"].sum()),
            "token_latency_s": {q: float(np.percentile(lat, int(q[1:]))) for q in ("p50", "p95", "p99")},
        }

    g = df.groupby("device")
    per_dev = g.size() / (g["t_commit"].max() - g["t_draft_start"].min())
    jain = float(per_dev.sum() ** 2 / (len(per_dev) * (per_dev**2).sum()))
    tiers = {}
    for tier, d in df.groupby("tier", sort=False):
        span = float(d["t_commit"].max() - d["t_draft_start"].min())
        x = per_dev[d["device"].unique()]
        tiers[tier] = {
            "devices": int(d["device"].nunique()),
            "policy": policies[tier],
            "throughput_tokens_per_s": len(d) / span,
            "jain_fairness": float(x.sum() ** 2 / (len(x) * (x**2).sum())),
            **figures(d),
        }
    summary = {
        "scenario": name,
        "emulated_seconds": emu,
        "wall_seconds": 3.2,
        "tokens": len(df),
        "devices": len(per_dev),
        "throughput_tokens_per_s": {
            "system": len(df) / emu,
            "tiers": {t: b["throughput_tokens_per_s"] for t, b in tiers.items()},
            "devices": {str(k): float(v) for k, v in per_dev.items()},
        },
        **figures(df),
        "jain_fairness": jain,
        "verifier_batch_size_mean": float(np.mean(batches)) if batches else None,
        "verifier_batches": len(batches),
        "vocab_size": V,
        "tiers": tiers,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    tier_yaml = "".join(f"  - name: {t}\n    count: {n}\n    policy: {policies[t]}\n" for t, n in devices.items())
    (out / "scenario.yaml").write_text(f"name: {name}\nseed: {seed}\nclock: virtual\ntiers:\n{tier_yaml}")
    return out


@pytest.fixture
def make_run():
    """make_synthetic_run, for a test to call with its own policies, devices and seed."""
    return make_synthetic_run
