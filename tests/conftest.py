"""Shared pytest fixtures. Keep each one small; append new fixtures below."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class RealModels:
    """The prepared default pair. Models load lazily, once per test session (seconds each)."""

    pair: str
    slm_spec: object  # agents.models.ModelSpec
    llm_spec: object

    @functools.cache  # noqa: B019 - one model pair per test session: kept on purpose
    def slm(self):
        from agents.models import load_model

        return load_model(self.slm_spec)

    @functools.cache  # noqa: B019 - one model pair per test session: kept on purpose
    def llm(self):
        from agents.models import load_model

        return load_model(self.llm_spec)

    @functools.cache  # noqa: B019 - one model pair per test session: kept on purpose
    def tokenizer(self):
        from agents.models import load_tokenizer

        return load_tokenizer(self.slm_spec)


@pytest.fixture(scope="session")
def real_models() -> RealModels:
    """The prepared Qwen pair (`testbed models prepare`). Skips when it is not prepared, but fails
    when HLM_REQUIRE_REAL_MODELS=1 (CI), so a missing pair cannot pass silently there."""
    from agents.models import DEFAULT_PAIR, cache_dir, get_pair, pair_specs

    missing = [m.spec for m in get_pair(DEFAULT_PAIR).members if not m.is_ready()]
    if missing:
        reason = f"{', '.join(missing)} not prepared in {cache_dir()}: run `testbed models prepare`"
        if os.environ.get("HLM_REQUIRE_REAL_MODELS") == "1":
            pytest.fail(f"HLM_REQUIRE_REAL_MODELS=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    slm, llm = pair_specs(DEFAULT_PAIR)
    return RealModels(DEFAULT_PAIR, slm, llm)
