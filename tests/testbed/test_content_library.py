"""Content libraries (docs/design.md section 8): a virtual-clock run's content recorded with its
provenance, and fleets that replay it without models. The exactness test: a recorded run replayed
with the same timing settings gives that run's tokens.parquet in every column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from testbed import results
from testbed.config.io import parse_scenario
from testbed.content import FORMAT_VERSION, Library, LibraryError
from testbed.content.draw import draw
from testbed.run import RunOptions, run_scenario
from testbed.scenario import ScenarioError, load_scenario, override

# The columns a run's timing settings (links, server) decide; every other column is content.
TIMING = {
    "t_draft_start",
    "t_upload_sent",
    "t_verdict",
    "t_commit",
    "retransmissions",
    "uplink_bytes",
    "uplink_lost",
    "downlink_bytes",
    "downlink_lost",
    "flush_bytes",
    "flush_retransmissions",
}


def recorded_scenario():
    """smoke, 12 tokens: two tiers, two policies, a lossy Wi-Fi link (retransmissions)."""
    return override(load_scenario("smoke"), {"generation.max_new_tokens": 12})


def replay_scenario(library: Path, draw_mode: str = "recorded", **changes):
    """The recorded scenario's fleet and timing, its content from `library` (no models)."""
    d = recorded_scenario().resolved_dict()
    d.pop("models")
    d["generation"] = {"temperature": d["generation"]["temperature"]}
    for t in d["tiers"]:
        t["content"] = {"library": str(library), "draw": draw_mode}
    for key, value in changes.items():
        node = d
        *path, last = key.split(".")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    return parse_scenario(d)


def run(s, out: Path, **opts) -> pd.DataFrame:
    run_scenario(s, RunOptions(out_dir=out, progress=False, report=False, **opts))
    return results.read_tokens(out / "tokens.parquet")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(library, the recording run's folder and tokens) from one local run with tiny models."""
    root = tmp_path_factory.mktemp("library")
    library = root / "lib"
    df = run(recorded_scenario(), root / "run", engine="local", save_content=library, recording="smoke12")
    return library, root / "run", df


def test_a_recorded_run_replays_to_its_own_trace_in_every_column(recorded, tmp_path):
    library, run_dir, before = recorded
    after = run(replay_scenario(library), tmp_path / "replay", engine="local")
    assert len(before) == recorded_scenario().n_devices * 12
    pd.testing.assert_frame_equal(before, after, check_exact=True)
    # ... and the figures computed from it
    a = json.loads((run_dir / "summary.json").read_text())
    b = json.loads((tmp_path / "replay" / "summary.json").read_text())
    for key in ("tokens", "throughput_tokens_per_s", "skip_rate", "uplink_bytes", "jain_fairness", "fidelity_tv_mean"):
        assert a[key] == b[key], key


def test_other_links_or_server_change_only_timing_columns(recorded, tmp_path):
    library, _, before = recorded
    slower = replay_scenario(
        library,
        **{"tiers.0.link": "lte-edge", "server.verify_ms.base": 80.0, "server.max_batch": 2},
    )
    after = run(slower, tmp_path / "slower", engine="local")
    content = [c for c in before.columns if c not in TIMING]
    pd.testing.assert_frame_equal(before[content], after[content], check_exact=True)
    assert not before["t_commit"].equals(after["t_commit"])  # a control: the timing did change


def test_a_library_records_its_provenance_and_lists_its_policies(recorded):
    library, _, before = recorded
    lib = Library.open(library)
    (r,) = lib.recordings
    pv = r.provenance
    assert r.name == "smoke12" and pv["format_version"] == FORMAT_VERSION
    assert pv["seed"] == 7 and pv["models"] == {"slm": "tiny:slm", "llm": "tiny:llm"}
    assert pv["max_new_tokens"] == 12 and pv["machine"]["cpu_capability"]
    assert pv["testbed_version"].startswith("0.1.0") and pv["command"]
    labels = {p["label"]: p["sequences"] for p in lib.policies().values()}
    assert labels == {"cu-hlm": 6, "u-hlm": 2}
    seqs = r.sequences.to_pandas()
    assert list(seqs["n_tokens"]) == [12] * 8 and (seqs["stop_reason"] == "length").all()
    assert r.tokens.num_rows == len(before)
    # every verdict of a device is one of its transmitted tokens or its final flush
    uploads = before.groupby("device")["transmitted"].sum()
    per_device = r.verdicts.to_pandas().groupby("sequence").size()
    assert (per_device.to_numpy() >= uploads.to_numpy()).all()
    assert (per_device.to_numpy() <= uploads.to_numpy() + 1).all()


def _rewrite(path: Path, meta_update=None, drop: str | None = None) -> None:
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    key = b"hlm_testbed.content_library"
    if meta_update:
        meta[key] = json.dumps({**json.loads(meta[key]), **meta_update}).encode()
    if drop:
        table = table.drop_columns([drop])
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_an_incompatible_library_is_refused_with_what_differs(recorded, tmp_path):
    import shutil

    library, _, _ = recorded
    copy = tmp_path / "lib"
    shutil.copytree(library, copy)
    _rewrite(copy / "smoke12" / "sequences.parquet", {"format_version": FORMAT_VERSION + 1})
    with pytest.raises(LibraryError, match=f"format version {FORMAT_VERSION + 1}, this testbed reads version 1"):
        Library.open(copy)
    shutil.rmtree(copy)
    shutil.copytree(library, copy)
    _rewrite(copy / "smoke12" / "tokens.parquet", drop="draft_prob")
    with pytest.raises(LibraryError, match="draft_prob \\(missing\\)"):
        Library.open(copy).pool("u-hlm")
    with pytest.raises(LibraryError, match="not found"):
        Library.open(tmp_path / "nowhere")


def test_validation_refuses_a_policy_the_library_lacks_and_names_those_it_has(recorded):
    library, _, _ = recorded
    with pytest.raises(ScenarioError) as e:
        from testbed.preflight import preflight

        preflight(replay_scenario(library, **{"tiers.1.policy": "hlm"}))
    text = str(e.value)
    assert "tiers[1].content.library" in text and "no content of policy" in text
    assert "'name': 'cu-hlm'" in text and "'name': 'u-hlm'" in text  # what the library holds


def test_a_library_scenario_takes_all_its_content_from_libraries(recorded):
    library, _, _ = recorded
    d = replay_scenario(library).resolved_dict()
    mixed = {
        **d,
        "tiers": [d["tiers"][0], {**d["tiers"][1], "content": None}],
        "models": {"slm": "tiny", "llm": "tiny"},
    }
    with pytest.raises(ScenarioError, match="takes its content from the models but others replay"):
        parse_scenario(mixed)
    with pytest.raises(ScenarioError, match="remove models"):
        parse_scenario({**d, "models": {"slm": "tiny", "llm": "tiny"}})
    with pytest.raises(ScenarioError, match="virtual clock only"):
        parse_scenario({**d, "clock": "wall"})
    with pytest.raises(ScenarioError, match="recorded with max_new_tokens 12"):
        from testbed.preflight import preflight

        preflight(parse_scenario({**d, "generation": {"max_new_tokens": 16}}))
    no_models = {k: v for k, v in d.items() if k != "models"}
    no_models["tiers"] = [{k: v for k, v in t.items() if k != "content"} for t in d["tiers"]]
    with pytest.raises(ScenarioError, match="models.*required"):
        parse_scenario(no_models)


def test_draws_are_keyed_by_seed_and_device(recorded):
    library, _, _ = recorded
    pool = Library.open(library).pool("cu-hlm")
    n = len(pool)
    ids = np.arange(100_000, 160_000)
    a = draw(pool, ids, seed=7, mode="random")
    assert (a == draw(pool, ids[::-1], 7, "random")[::-1]).all()  # a device's draw ignores the others
    assert not (a == draw(pool, ids, 8, "random")).all()
    # uniform over the pool: chi-square with n - 1 = 5 degrees of freedom, far below the 0.1% point (20.5)
    counts = np.bincount(a, minlength=n)
    chi2 = ((counts - len(ids) / n) ** 2 / (len(ids) / n)).sum()
    assert chi2 < 20.5
    b = draw(pool, ids[:n], 7, "no-replacement")
    assert sorted(b) == list(range(n))  # a tier of n devices replays n distinct sequences
    c = np.bincount(draw(pool, ids[: 3 * n + 2], 7, "no-replacement"), minlength=n)
    assert c.max() - c.min() <= 1  # each once before any twice
    assert list(draw(pool, np.arange(6), 7, "recorded")) == list(range(6))
    with pytest.raises(LibraryError, match="device 6 .*has no sequence of policy cu-hlm"):
        draw(pool, np.arange(8), 7, "recorded")


def three_verifiers(s):
    """s served by three verifiers (round-robin): three independent partitions."""
    d = s.resolved_dict()
    server = d.pop("server")
    d["servers"] = [{"name": "gpu", "count": 3, **{k: server[k] for k in ("verify_ms", "max_batch", "max_wait_ms")}}]
    if s.replays_library:  # the length is the library's
        d["generation"].pop("max_new_tokens")
    return parse_scenario(d)


def test_partitions_replay_the_same_in_this_process_and_on_ray(recorded, tmp_path, ray_session):
    """Several verifiers: a model run (its record replayed per partition), its library replayed in this
    process and as Ray tasks: one trace."""
    library, _, _ = recorded
    models = run(three_verifiers(recorded_scenario()), tmp_path / "models", engine="local")
    here = run(three_verifiers(replay_scenario(library)), tmp_path / "here", engine="local")
    on_ray = run(three_verifiers(replay_scenario(library)), tmp_path / "ray", engine="ray")
    pd.testing.assert_frame_equal(models, here, check_exact=True)
    pd.testing.assert_frame_equal(here, on_ray, check_exact=True)
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["partitions"]["count"] == 3 and summary["verifier_batches"] > 0
    assert not (tmp_path / "ray" / "tokens.parts").exists()  # joined into tokens.parquet, then removed


def test_absorbed_partitions_give_the_metrics_of_one_collector(recorded, tmp_path):
    """Collector.absorb of each partition's state equals one collector folding every partition's events."""
    from policies import load_policy
    from testbed.metrics import Collector
    from testbed.run.partitions import replay_one
    from testbed.run.plan import plan
    from testbed.run.replay import partitions, replay_partition

    library, _, _ = recorded
    p = plan(three_verifiers(replay_scenario(library)))
    policies = {name: load_policy(spec) for name, spec in p.policy_specs.items()}
    direct, merged = Collector("x"), Collector("x")
    for slot, server, ids in partitions(p):
        direct.verifier = slot.name  # the label a partition's collector gives its batches
        replay_partition(p, server, ids, policies, direct.ingest_events)
        merged.absorb(replay_one(p, slot, server, ids, tmp_path, policies).collector)
    a_series, b_series = _series(direct), _series(merged)
    assert a_series.keys() == b_series.keys() and any("hlm_token_latency_seconds_bucket" in k for k in a_series)
    assert any('verifier="gpu-2"' in k for k in a_series)  # by verifier: three of them, under 16
    for key, value in a_series.items():  # counts exactly; a histogram's sum up to the order of its additions
        assert b_series[key] == (pytest.approx(value, rel=1e-12) if "_sum{" in key else value), key
    a, b = direct.snapshot(), merged.snapshot()
    assert (a.totals, a.jain_run, a.verifier_batches, a.emulated_s) == (
        b.totals,
        b.jain_run,
        b.verifier_batches,
        b.emulated_s,
    )


def _series(collector) -> dict[str, float]:
    """Every sample of the exposition but the wall-clock ones: series -> value."""
    out = {}
    for line in collector.exposition().decode().splitlines():
        if line.startswith("#") or "wall" in line or "_created" in line:
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
    return out
