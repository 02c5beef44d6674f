"""CU-HLM transmission policies: uncertainty estimators, rejection model and thresholds,
truncators, quantisers, their composition into a Policy, and the registry of presets.

Pure numpy/torch; never imports agents, netem or testbed.
"""

from policies.base import PROB_BITS, Decision, DecisionContext, Key, Policy, TokenBatch
from policies.policy import PRESETS, HybridPolicy, LLMOnlyPolicy, PolicyConfig, Preset
from policies.registry import (
    ENTRY_POINT_GROUP,
    PolicyError,
    known_names,
    load_policy,
    policy_catalog,
    register_policy,
    unregister_policy,
)
from policies.rejection import (
    PAPER_A,
    PAPER_B,
    DegenerateFitError,
    RejectionFit,
    RejectionModel,
    fit_rejection_model,
    risk_averse_threshold,
    risk_prone_threshold,
    threshold,
)
from policies.rng import keyed_rng
from policies.truncation import (
    calibrate_offline_k,
    online_k_star,
    top_p_k,
    tv_denominator,
    tv_numerator,
    u_tv,
)
from policies.uncertainty import (
    ESTIMATORS,
    entropy,
    make_estimator,
    one_minus_max,
    temperature_perturbation,
    top2_margin,
)

__all__ = [
    "Decision",
    "DecisionContext",
    "DegenerateFitError",
    "ENTRY_POINT_GROUP",
    "ESTIMATORS",
    "HybridPolicy",
    "Key",
    "LLMOnlyPolicy",
    "PAPER_A",
    "PAPER_B",
    "PRESETS",
    "PROB_BITS",
    "Policy",
    "PolicyConfig",
    "PolicyError",
    "Preset",
    "RejectionFit",
    "RejectionModel",
    "TokenBatch",
    "calibrate_offline_k",
    "entropy",
    "fit_rejection_model",
    "keyed_rng",
    "known_names",
    "load_policy",
    "make_estimator",
    "one_minus_max",
    "online_k_star",
    "policy_catalog",
    "register_policy",
    "risk_averse_threshold",
    "risk_prone_threshold",
    "temperature_perturbation",
    "threshold",
    "top2_margin",
    "top_p_k",
    "tv_denominator",
    "tv_numerator",
    "u_tv",
    "unregister_policy",
]
