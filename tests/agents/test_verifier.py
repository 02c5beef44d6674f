"""agents.verifier: the k-th earliest arrival of the queue (the batching rule's close), both of its forms."""

import heapq
import random

from agents.verifier import _kth_arrival, _kth_arrival_walk


def test_kth_arrival_partition_equals_walk_and_sort():
    rng = random.Random(0)
    for n in (1, 2, 7, 300, 5000):
        queue: list = []
        for device in range(n):  # ties included: arrivals on a coarse grid
            heapq.heappush(queue, (round(rng.uniform(0, 1), 2), device, 0))
        arrivals = sorted(q[0] for q in queue)
        for k in {1, max(1, n // 3), n}:
            assert _kth_arrival(queue, k) == _kth_arrival_walk(queue, k) == arrivals[k - 1]
