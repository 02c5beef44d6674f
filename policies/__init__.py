"""CU-HLM transmission policies: uncertainty estimators, rejection model and thresholds,
truncators, quantisers, their composition into a Policy, and the registry of presets.

Pure numpy/torch; never imports agents, netem or testbed.
"""
from policies.base import Decision, DecisionContext, Key, Policy, TokenBatch
from policies.policy import PRESETS, HybridPolicy, LLMOnlyPolicy, PolicyConfig, Preset
from policies.quantise import PROB_BITS
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

import types as _types

__all__ = [n for n, v in dict(globals()).items() if not n.startswith("_") and not isinstance(v, _types.ModuleType)]
