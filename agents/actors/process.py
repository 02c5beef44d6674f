"""A worker process's torch threads and memory, as the actors report them."""

from __future__ import annotations


def max_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory() -> dict:
    """This process's memory now: resident anonymous (private: activations, KV caches, converted
    weights) vs file-backed (memory-mapped safetensors, shared by every process loading the same
    folder), and the peak."""
    out = {"peak_rss_bytes": max_rss_bytes()}
    try:
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[key.lower().replace("rss", "rss_") + "_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))
