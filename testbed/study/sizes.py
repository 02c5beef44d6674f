"""What a study is compared against and how big it runs: the papers' headline numbers, the policies'
shared constants and the --size presets of `testbed reproduce` (docs/design.md section 7).

Sizes (`SIZES`; each one's `why` says why): smoke (tiny models, 4 problems, 8 tokens: seconds, for CI),
small (the Qwen pair on HumanEval/40..55, up to 256 tokens ending at eos / the HumanEval stop
sequences, 13 points: about an hour on a 2-core CPU with native bf16, several on an fp32-only one, see
testbed.study.estimate), medium (all 164 problems, 256 tokens with stops: an overnight CPU run,
resumable), full (all 164 problems x 5 samples, 256 tokens: a GPU machine, scripts/reproduce_full_gpu.sh).
"""

from __future__ import annotations

from dataclasses import dataclass

# Headline numbers as the abstracts state them (CU-HLM vs standard HLM; U-HLM vs HLM without skipping).
PAPER = {
    "cu-hlm": {
        "throughput_ratio_hlm": 206.0,
        "skip_rate": 0.748,
        "vocab_compression": 0.974,
        "pass_at_1_relative": 0.974,
    },
    "u-hlm": {"throughput_ratio_hlm": 2.54, "skip_rate": 0.4593, "pass_at_1_relative": 0.9754},
    "fit": {
        "a": 0.815,
        "b": -0.066,
        "models": "TinyLlama-1.1B / Llama-2-7B",
        "u_th_risk_averse": 0.081,
        "u_th_risk_prone": 0.81,
    },
}
# `testbed calibrate` on the Qwen pair (HumanEval, 8 prompts x 48 tokens): a reference, not used.
QWEN_CALIBRATE_FIT = {"a": 0.491, "b": -0.002}

# Every policy of both studies; the fleet study runs each at every fleet size.
POLICIES = ("llm-only", "slm-only", "hlm", "rand-hlm", "u-hlm", "cu-hlm", "cu-hlm-offline", "cu-hlm-adaptive")
FLEET_POLICIES = POLICIES
RISK_PRONE_BETA_TOL = 0.5  # policies.rejection: u_th = (beta_tol - b) / a
DEFAULT_THETA, DEFAULT_ETA = 0.1, 1.0  # cu-hlm's preset defaults (policies.policy)
ESTIMATOR = "temperature"  # the papers' estimator; its fit parameterises the policies


@dataclass(frozen=True)
class Size:
    name: str
    models: dict | None  # None: the bundled scenario's (the Qwen pair)
    offset: int  # HumanEval problems offset .. offset + count - 1 (accuracy needs a contiguous slice)
    count: int | None  # None: to the end
    max_new_tokens: int
    calibration_tokens: int
    kstar_tokens: int  # tokens whose SLM distribution calibrates the offline k*
    u_th: tuple[float, ...]  # fixed thresholds of the u_th sweep (cu-hlm)
    theta: tuple[float, ...]  # distortion budgets of the theta sweep (cu-hlm, risk-averse)
    risks: tuple[float, ...]  # cu-hlm-adaptive risk budgets
    fleet_sizes: tuple[int, ...]
    fleet_tokens: int
    why: str = ""
    # cu-hlm-adaptive runs at every risk budget with each of these estimators: temperature (cu-hlm's u,
    # so the learned rule alone differs) and max (1 - max x: deterministic and continuous, so the
    # learned threshold can sit between tokens that temperature perturbation gives the same u)
    adaptive_estimators: tuple[str, ...] = ("temperature", "max")
    # samples per problem: devices = problems x samples, device i decodes problem i mod problems with its
    # own keyed randomness, so a problem's samples are independent (unbiased pass@1, testbed.accuracy)
    samples: int = 1


TINY = {"slm": "tiny:slm", "llm": "tiny:llm", "dtype": "float32"}
SIZES: dict[str, Size] = {
    "smoke": Size(
        "smoke",
        TINY,
        0,
        4,
        8,
        8,
        32,
        (0.3, 1.0),
        (0.5,),
        (0.05,),
        (2, 6),
        8,
        "tiny random models, 4 problems x 8 tokens: the whole pipeline in seconds (CI)",
    ),
    "small": Size(
        "small",
        None,
        40,
        16,
        256,
        16,
        128,
        (0.25,),
        (),
        (0.01,),
        (4, 16),
        24,
        "the Qwen pair on HumanEval/40..55, up to 256 new tokens ending at eos / the HumanEval stop "
        "sequences (generation.stop), so completions can finish. 16 problems fill one 16-row GEMM tile "
        "(the batch costs what batch 1 does), and a point costs its longest completion in token-steps: "
        "of all 16-problem windows this one has the shortest longest canonical solution (74 Qwen "
        "tokens), but at temperature 1 one completion in 16 runs on to 256 (measured), so most points "
        "cost ~256 steps (~7 min with bf16). Hence 13 points: calibration, every policy once, the "
        "adaptive policy with the max estimator at risk 0.01 (the README's claim), the u_th sweep at "
        "risk-averse (cu-hlm), 0.25, risk-prone and both sides of the risk-averse flip (0: every u = 0 "
        "token skipped; -1: none), no theta sweep: about an hour on a 2-core CPU with native bf16 "
        "(estimate). On 16 problems the paired exact test needs at least 6 "
        "discordant problems, all one way (p = 0.031): it tells apart large differences only; "
        "--size medium for small ones",
        adaptive_estimators=("max",),
    ),
    "medium": Size(
        "medium",
        None,
        0,
        None,
        256,
        16,
        256,
        (0.1, 0.25, 0.5),
        (0.02, 0.5),
        (0.005, 0.02),
        (4, 16),
        24,
        "all 164 HumanEval problems, up to 256 new tokens with stops: an overnight CPU run (resumable: "
        "rerun to continue), the small study's points with a finer u_th sweep, two theta and two risk "
        "budgets; 164 paired problems resolve pass@1 differences of a few points",
    ),
    "full": Size(
        "full",
        None,
        0,
        None,
        256,
        64,
        256,
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
        (0.005, 0.01, 0.03, 0.3, 1.0),
        (0.01, 0.05),
        (16, 64, 256),
        128,
        "all 164 problems x 5 samples each (820 devices, unbiased pass@1), up to 256 tokens with stops: "
        "a GPU machine (scripts/reproduce_full_gpu.sh)",
        samples=5,
    ),
}
