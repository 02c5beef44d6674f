"""The pieces of the decision law (policies.law): the perturbation quadrature against a much finer rule
(the error its docstring states), the binomial law of u against its definition, and KStarTable's k* for
every draft against online_k_star itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from policies.benchmark import lm_like_logits
from policies.law import binomial_pmf
from policies.truncation import KStarTable, online_k_star
from policies.uncertainty import perturbation_keep_prob

V = 20_000


def _fine(z) -> np.ndarray:
    return perturbation_keep_prob(z, 2.0, panels=128)  # 1,024 nodes


def test_quadrature_error_is_what_the_docstring_states():
    for z in lm_like_logits(4, V, seed=3).numpy():
        assert np.abs(perturbation_keep_prob(z) - _fine(z)).max() < 1e-8
    g = np.random.default_rng(0)
    for gap in (1e-3, 1e-2):  # adversarial: the top two nearly tie, the integrand steps at theta ~ gap
        z = g.normal(0.0, 2.0, V)
        z[0] = z.max() + 10.0
        z[1] = z[0] - gap
        assert np.abs(perturbation_keep_prob(z) - _fine(z)).max() < 2e-5
    # and it is the probability that one perturbed sample equals d (brute force on a small vocabulary)
    z = np.array([2.0, 1.5, 0.2, -1.0])
    thetas = 2.0 * (1.0 - np.random.default_rng(1).random(400_000))
    e = np.exp((z - z.max())[None, :] / thetas[:, None])
    assert perturbation_keep_prob(z) == pytest.approx((e / e.sum(1, keepdims=True)).mean(0), abs=3e-3)


def test_binomial_pmf_is_the_definition():
    q = np.array([0.0, 1e-12, 0.1, 0.5, 0.73, 1 - 1e-12, 1.0])
    want = np.array([[math.comb(20, j) * p**j * (1 - p) ** (20 - j) for j in range(21)] for p in q])
    np.testing.assert_allclose(binomial_pmf(20, q), want, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_k_star_table_equals_online_k_star_for_every_draft(beta):
    for z in lm_like_logits(3, V, seed=5):
        x = torch.softmax(z.double(), 0).numpy()
        drafts = np.argsort(-x)[:200]  # the drafts whose k can differ, and many that share the bulk's
        got = KStarTable(x, 0.1, 1.0).k_for(beta, drafts)
        want = online_k_star(
            torch.from_numpy(np.tile(x, (drafts.size, 1))), drafts, np.full(drafts.size, beta), 0.1, 1.0
        )
        np.testing.assert_array_equal(got, want)
