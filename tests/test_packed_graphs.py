"""Static-shape packed batches (backends/packed_graphs.py): the layout, and on the CPU the same
embeddings as the plain packed path (the CUDA graphs themselves: tests/test_cuda_fast.py)."""
import random

import pytest
import torch

from conftest import random_image
from rematch_fast import InputError, Item, ReMatch
from rematch_fast.backends.packed_graphs import TOKEN_STEP, slot_bounds, static_shape

ATOL = 1e-4


@pytest.mark.parametrize("lengths, shape, bounds", [
    ([100, 30], (256, 128, 4), [0, 100, 130, 256, 256]),  # 126 rows of padding: one dummy, one empty slot
    ([40, 20, 10], (256, 64, 8), [0, 40, 60, 70, 134, 198, 256, 256, 256]),  # padding cut to <= 64 rows
    ([256], (256, 256, 1), [0, 256]),  # no padding, no spare slot
    ([64, 64, 64, 64], (256, 64, 4), [0, 64, 128, 192, 256]),  # tokens = slots x longest: every slot that long
    ([300], (512, 512, 2), [0, 300, 512]),
    ([1100], (1280, 1280, 2), [0, 1100, 1280]),  # the longest length is never past the tokens
])
def test_static_layout(lengths, shape, bounds):
    assert static_shape(lengths) == shape
    assert slot_bounds(lengths, *shape) == bounds


def test_static_layout_holds_any_batch():
    rng = random.Random(5)
    for _ in range(500):
        lengths = [rng.randint(1, rng.choice([8, 70, 300, 2000])) for _ in range(rng.randint(1, 80))]
        tokens, longest, slots = static_shape(lengths)
        bounds = slot_bounds(lengths, tokens, longest, slots)
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        assert tokens % TOKEN_STEP == 0 and tokens - sum(lengths) < TOKEN_STEP
        assert len(sizes) == slots and sizes[:len(lengths)] == lengths and max(sizes) <= longest
        assert slots & (slots - 1) == 0 and bounds[-1] == tokens
    with pytest.raises(ValueError, match="do not fit"):
        slot_bounds([100, 30], 256, 128, 2)


def _texts(seed, n):
    rng = random.Random(seed)
    words = ["river", "photo", "seven", "blue", "alpha", "station", "quiet"]
    return [" ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 9, 30, 70]))) for _ in range(n)]


@pytest.fixture(scope="module")
def plain(tiny_paths):
    return {a: ReMatch.from_pretrained(p, backend="fast") for a, p in tiny_paths.items()}


@pytest.mark.parametrize("share_prefix", [True, False])
def test_static_shapes_give_the_same_embeddings(tiny_paths, plain, arch, share_prefix):
    """Texts of many lengths in batches of several shapes (padding rows, dummy and empty slots,
    shapes met again with other contents), images among them, both sides."""
    m = ReMatch.from_pretrained(tiny_paths[arch], backend="fast", packed_graphs=True, share_prefix=share_prefix)
    base = plain[arch] if share_prefix else ReMatch.from_pretrained(tiny_paths[arch], backend="fast",
                                                                    share_prefix=False)
    seed = random.randrange(1 << 30)  # fresh inputs every run; the seed is in the failure message
    items = _texts(seed, 14) + [Item(text="caption", image=random_image(97, 213, seed % 1000)),
                                Item(image=random_image(61, 333, seed % 1000 + 1))]
    for side, limits in (("document", dict(batch_tokens=400)), ("query", dict(batch_size=3)),
                         ("document", dict(batch_tokens=400))):  # the last run meets its shapes again
        got, want = m.encode(items, side=side, **limits), base.encode(items, side=side, **limits)
        torch.testing.assert_close(got.unit, want.unit, atol=ATOL, rtol=0, msg=lambda s: f"seed {seed}: {s}")
        torch.testing.assert_close(got.norm, want.norm, atol=0, rtol=ATOL, msg=lambda s: f"seed {seed}: {s}")
    seen = m.backend.graphs.seen  # shape key -> batches
    # several shapes, some met again (how many depends on the drawn lengths: 3 or more nearly always,
    # 2 in a rare draw, as in a CI run of 2026-11-27)
    assert len(seen) >= 2 and max(seen.values()) >= 2, f"seed {seed}: {seen}"
    assert all((prefix is not None) == share_prefix for *_, prefix in seen)
    assert not m.backend.graphs.graphs  # captured on CUDA only


def test_packed_graphs_is_off_by_default_and_refuses_what_it_cannot_capture(tiny_paths, plain):
    from rematch_fast.backends.packed_graphs import check_capturable

    assert all(m.backend.graphs is None for m in plain.values())
    with pytest.raises(InputError, match="compile and packed_graphs"):
        ReMatch.from_pretrained(tiny_paths["qwen2-vl"], backend="fast", packed_graphs=True, compile="default")
    with pytest.raises(InputError, match="bfloat16 or float16"):  # fp32 attention reads the lengths on the host
        check_capturable(torch.device("cuda"), torch.float32, 128)
    check_capturable(torch.device("cpu"), torch.float32, 128)  # elsewhere the layout runs eagerly
    pytest.importorskip("bitsandbytes", reason="the bnb-* presets need bitsandbytes")
    for preset in ("bnb-int8", "bnb-nf4"):  # bitsandbytes' kernels read device values on the host
        for option in (dict(packed_graphs=True), dict(latency_buckets=(64,))):
            with pytest.raises(InputError, match="CUDA graphs cannot capture"):
                ReMatch.from_pretrained(tiny_paths["qwen2-vl"], backend="fast", quantize=preset, **option)


class ReplayedOnTheCpu:
    """A stand-in for a captured CUDA graph: capturing runs nothing (the buffers hold no batch
    yet) and makes the outputs; a replay runs the recorded forward on the buffers as they are now
    and writes into those outputs, as a graph does."""

    def __init__(self, forward, s):
        self.forward = forward
        self.out = (torch.full((s["readout"].shape[0], s["embeds"].shape[1]), float("nan")),
                    torch.full((s["readout"].shape[0],), float("nan")))

    def replay(self):
        for dest, value in zip(self.out, self.forward()):
            dest.copy_(value)


@pytest.fixture
def stand_in_graphs(tiny_paths, monkeypatch):
    """A packed-graphs model whose captures make ReplayedOnTheCpu stand-ins (the CUDA path's
    bookkeeping, on the CPU)."""
    from rematch_fast.backends.packed_graphs import PackedGraphs

    def capture(self, s):
        graph = ReplayedOnTheCpu(lambda: self._forward(s), s)
        s["out"], s["replay"] = graph.out, graph.replay
        return s

    monkeypatch.setattr(PackedGraphs, "_capture", capture)
    m = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], backend="fast", packed_graphs=True)
    m.backend.graphs.capturable = True
    return m


def _same_lengths(rng, lengths=(1, 3, 9, 30, 70, 5, 50, 12, 2, 40, 20, 8, 150)):
    """Texts of these numbers of one-token words, other words each call: the same shapes, other contents."""
    return [" ".join(rng.choice(["river", "photo", "blue", "seven"]) for _ in range(n)) for n in lengths]


def test_capture_and_replay_bookkeeping(stand_in_graphs, plain):
    """A shape is captured at its second batch (not its first) and replayed after with other
    contents (the buffers refilled, padding and spare rows included); query and document batches
    of the same shape keep their own graphs (each continues its side's template prefix); graphs
    of one token count read one set of inputs."""
    m, graphs = stand_in_graphs, stand_in_graphs.backend.graphs
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for round in range(3):
        for side in ("document", "query"):
            items = _same_lengths(rng)
            got = m.encode(items, side=side, batch_tokens=300)
            want = plain["qwen2.5-vl"].encode(items, side=side, batch_tokens=300)
            torch.testing.assert_close(got.unit, want.unit, atol=ATOL, rtol=0, msg=lambda s: f"seed {seed}: {s}")
            assert set(graphs.graphs) == {key for key, n in graphs.seen.items() if n >= 2}, f"round {round}"
    assert any(n > 2 for key, n in graphs.seen.items() if key in graphs.graphs)  # replayed
    assert len({prefix for *_, prefix in graphs.graphs}) == 2  # one template prefix per side
    for key, s in graphs.graphs.items():
        assert s["embeds"] is graphs.inputs[key[0]][0] and s["positions"] is graphs.inputs[key[0]][1]


def test_past_max_graphs_new_shapes_run_eagerly(stand_in_graphs, plain):
    m, graphs = stand_in_graphs, stand_in_graphs.backend.graphs
    graphs.max_graphs = 1
    rng = random.Random(11)
    for _ in range(3):
        items = _same_lengths(rng)
        torch.testing.assert_close(m.encode(items, side="document", batch_tokens=300).unit,
                                   plain["qwen2.5-vl"].encode(items, side="document", batch_tokens=300).unit,
                                   atol=ATOL, rtol=0)
    assert len(graphs.graphs) == 1
    assert any(n >= 2 and key not in graphs.graphs for key, n in graphs.seen.items())
