"""Per-token cost of the estimators and truncators: `testbed bench policies [--json]`.

Measured in one run, best of `repeats`, one torch thread (as in a Ray actor), as process
CPU time (on a shared machine wall time also counts other tenants' use of the core). Two kinds of
synthetic logits at V = 151936: "lm" mimics a language model (a Gaussian bulk with a few
candidate tokens well above it, top-1 probability spread from ~0.3 to ~1) and "flat" (a
Gaussian bulk alone, entropy ~ log V: the worst case for the fast paths). The naive
references are the straightforward full-vocabulary computations, for ratios.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import policies.uncertainty as unc
from policies.base import Key
from policies.truncation import online_k_star, sorted_probs, tv_denominator, tv_numerator


def lm_like_logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    z = g.normal(0.0, 2.0, (batch, vocab)).astype(np.float32)
    for b in range(batch):
        n = 1 + g.geometric(0.3)
        top = z[b].max() + g.uniform(4.0, 14.0)
        cand = top - np.cumsum(np.r_[0.0, g.exponential(1.5, n - 1)])
        z[b, g.choice(vocab, n, replace=False)] = cand
    return torch.from_numpy(z)


def flat_logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0.0, 2.5, (batch, vocab)).astype(np.float32))


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def _naive_tp(z: torch.Tensor, d: torch.Tensor, keys: list[Key], K: int = 20, theta_max: float = 2.0) -> np.ndarray:
    thetas, r = unc.tp_draws(keys, K, theta_max)
    out = []
    for b in range(z.shape[0]):
        lp = torch.log_softmax(z[b][None, :] / torch.from_numpy(thetas[b]).float()[:, None], dim=1)[:, d[b]]
        out.append(np.mean(np.log(r[b]) >= lp.double().numpy()))
    return np.array(out)


def _naive_k_star(
    x: torch.Tensor, d: torch.Tensor, beta: torch.Tensor, theta: float = 0.1, eta: float = 1.0
) -> torch.Tensor:
    budget = theta * tv_denominator(x.double().gather(1, d[:, None])[:, 0], beta, eta)
    return (tv_numerator(sorted_probs(x)) <= budget[:, None]).int().argmax(dim=1) + 1


def run(vocab: int = 151936, batch: int = 32, repeats: int = 3, logits_file: str | None = None) -> dict[str, Any]:
    """`logits_file`: an .npy [N, V] of real SLM logits, measured as a third kind "file"."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kinds: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("lm", lambda: lm_like_logits(batch, vocab)),
        ("flat", lambda: flat_logits(batch, vocab)),
    ]
    if logits_file:
        kinds.append(("file", lambda: torch.from_numpy(np.load(logits_file)[:batch].astype(np.float32))))
    try:
        logits = {kind: make() for kind, make in kinds}
        rows = {kind: _measure(z, repeats) for kind, z in logits.items()}
        z = logits[kinds[-1][0]]
        return {"vocab_size": int(z.shape[1]), "batch": int(z.shape[0]), "torch_threads": 1, "per_token": rows}
    finally:
        torch.set_num_threads(threads)


def _measure(z: torch.Tensor, repeats: int) -> dict[str, Any]:
    """One kind of logits [B, V]: every estimator and truncator, in ms per token."""
    batch = z.shape[0]
    x = torch.softmax(z, dim=1)
    d = torch.multinomial(x, 1, generator=torch.Generator().manual_seed(1))[:, 0]
    keys = [(0, b, 0) for b in range(batch)]
    beta = torch.full((batch,), 0.2, dtype=torch.float64)
    calls: list[int] = []
    real = unc.log_p_draft_exact

    def counted(e: torch.Tensor, draft: int, thetas: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(e, draft, thetas)

    unc.log_p_draft_exact = counted  # count the exact fallbacks
    try:
        u = unc.temperature_perturbation(z, d, keys)
    finally:
        unc.log_p_draft_exact = real

    def per(seconds: float) -> float:
        return round(seconds / batch * 1e3, 4)

    r = {
        "tokens": batch,
        "mean_top1": round(float(x.max(dim=1).values.mean()), 3),
        "mean_u": round(float(u.mean()), 3),
        "tp_exact_fallbacks_per_token": len(calls) / batch,
        "temperature_perturbation_ms": per(_best(lambda: unc.temperature_perturbation(z, d, keys), repeats)),
        "temperature_perturbation_naive_ms": per(_best(lambda: _naive_tp(z, d, keys), repeats)),
        "entropy_ms": per(_best(lambda: unc.entropy(x), repeats)),
        "one_minus_max_ms": per(_best(lambda: unc.one_minus_max(x), repeats)),
        "top2_margin_ms": per(_best(lambda: unc.top2_margin(x), repeats)),
        "online_k_star_ms": per(_best(lambda: online_k_star(x, d, beta, 0.1, 1.0), repeats)),
        "online_k_star_full_sort_ms": per(_best(lambda: _naive_k_star(x, d, beta), repeats)),
        "median_k_star": int(np.median(online_k_star(x, d, beta, 0.1, 1.0))),
    }
    assert np.array_equal(online_k_star(x, d, beta, 0.1, 1.0), _naive_k_star(x, d, beta).numpy())
    return r
