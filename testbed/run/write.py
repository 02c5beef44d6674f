"""The run's results: tokens.parquet from the sinks' shards, summary.json, then pass@1 (HumanEval
prompts) and the report. A failed or interrupted run writes what it committed, marked interrupted."""

from __future__ import annotations

from testbed import results
from testbed.run.options import RunOptions
from testbed.run.plan import Plan, forward_threads, load_lms


def write_run(p: Plan, opts: RunOptions, sinks, status: dict, ok: bool, wall: float) -> None:
    """Everything the run writes once the engine has stopped (`ok`: it ran to the end)."""
    lms = status.pop("lms", None)
    content = status.pop("content", None)
    if content is not None and opts.save_content is not None and ok:
        from testbed.content import record_run

        status["recording"] = str(record_run(p, opts, content, status))
    if "profile" in status:
        status["profile"]["wall_s"] = round(wall, 3)
        if opts.profile and ok:  # after the wall time: the yardstick does not count in it
            add_compute_limit(p, status, opts.engine, *(lms or load_lms(p)))
    # The shards become tokens.parquet. Interrupted (Ctrl-C) or failed: what was committed so far
    # (in the virtual clock, the content pass's rows without times unless the replay ran).
    del content
    _give_back_memory()  # what the engine freed, before the summary reads the table (the driver's peak)
    df = sinks.results(opts.out_dir / "tokens.parquet")
    if not ok:
        status = {**status, **sinks.partial, "interrupted": True}
    if df is None or not len(df):
        return
    summary(p, opts, df, sinks.batch_sizes, wall, status)
    del df  # the accuracy score and the report read tokens.parquet themselves
    humaneval = p.scenario.prompts.source == "humaneval" and p.content is None  # a library replay: no tokenizer
    if opts.accuracy and humaneval and not status.get("interrupted"):
        from testbed.accuracy import score_run

        score_run(opts.out_dir, progress=opts.progress)  # pass@1 from executed tests
    if opts.report:
        from testbed.report import write_report

        write_report([opts.out_dir], opts.out_dir / "report")


def summary(p: Plan, opts: RunOptions, df, batch_sizes: list[int], wall: float, status: dict) -> dict:
    """summary.json from tokens.parquet's rows (`df`, already written) and the verifier's batch sizes."""
    from agents.actors import max_rss_bytes

    emulated = float(df["t_commit"].max()) if len(df) else 0.0
    # complete: every device's sequence ended (eos, stop or length), not only max_new_tokens each
    ended = int((df["stop_reason"] != "").sum()) if "stop_reason" in df.columns else 0
    extra = {
        "scenario": p.scenario.name,
        "engine": opts.engine,
        "clock": p.scenario.clock,
        "complete": ended == len(p.specs) and df["device"].nunique() == len(p.specs),
    }
    extra.update(status)
    out = results.summarize(
        df,
        emulated_seconds=emulated,
        wall_seconds=wall,
        vocab_size=p.run.vocab_size,
        verifier_batches=batch_sizes,
        extra=extra,
    )
    # This process's peak so far (replay, merge, summary; not the report after): it must not grow
    # with devices x tokens (issue 9). The Ray engine's peak_rss_bytes is its actors' sum plus this.
    out["driver_peak_rss_bytes"] = max_rss_bytes()
    if "peak_rss_bytes" in out:
        out["peak_rss_bytes"] += out["driver_peak_rss_bytes"]
    results.write_summary(out, opts.out_dir / "summary.json")
    return out


def add_compute_limit(p: Plan, status: dict, engine: str, slm, llm) -> None:
    from testbed.profile import compute_limit

    prof = status["profile"]
    lengths = [len(d.prompt_ids) for d in p.specs]
    # prompt tokens the prefix caches served (as the run's models describe themselves; on Ray the
    # slm's is summed over every group, ray_driver._every_group_served)
    served = {
        role: ((status.get("compute", {}).get(role) or {}).get("prefix_cache") or {}).get("tokens_served", 0)
        for role in ("slm", "llm")
    }
    limit = compute_limit(slm, llm, prof, lengths, len(p.specs), forward_threads(p.scenario, p.threads, engine), served)
    prof["compute_limit"] = limit
    prof["wall_over_compute_limit"] = round(prof["emulation_s"] / limit["seconds"], 3) if limit["seconds"] else None
    prof["total_wall_over_compute_limit"] = round(prof["wall_s"] / limit["seconds"], 3) if limit["seconds"] else None


def _give_back_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim; elsewhere a no-op),
    so that the summary's peak does not stack on memory the engine no longer uses."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
