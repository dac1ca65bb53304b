import random
import threading

import pytest

from rematch_fast.scheduler import plan_batches, prefetched


@pytest.mark.parametrize("padded", [False, True])
def test_batches_cover_every_item_once_within_budget(padded):
    rng = random.Random(7)
    lengths = [rng.randint(1, 300) for _ in range(997)]
    batches = plan_batches(lengths, max_tokens=1000, max_items=16, padded=padded)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for b in batches:
        cost = len(b) * max(lengths[i] for i in b) if padded else sum(lengths[i] for i in b)
        assert len(b) <= 16 and (cost <= 1000 or len(b) == 1)
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first


def test_an_item_longer_than_the_budget_gets_its_own_batch():
    assert plan_batches([5000, 10, 10], max_tokens=100, max_items=8, padded=False) == [[0], [1, 2]]
    assert plan_batches([50, 50, 50], max_tokens=100, max_items=8, padded=True) == [[0, 1], [2]]
    with pytest.raises(ValueError):
        plan_batches([1], max_tokens=0, max_items=1, padded=False)


def test_prefetched_keeps_order_runs_ahead_and_raises():
    seen_threads = set()

    def work(x):
        seen_threads.add(threading.current_thread().name)
        return x * 2

    assert list(prefetched(range(5), work)) == [0, 2, 4, 6, 8]
    assert all(name.startswith("rematch-prefetch") for name in seen_threads)

    def boom(x):
        if x == 2:
            raise KeyError("bad chunk")
        return x

    with pytest.raises(KeyError, match="bad chunk"):
        list(prefetched(range(4), boom))
