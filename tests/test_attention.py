"""Packed variable-length attention against attention computed sequence by sequence."""
import pytest
import torch

from rematch_fast.model.attention import varlen_attention
from rematch_fast.model.batch import AttentionPlan

CASES = [  # device, dtype, tolerance
    ("cpu", torch.float32, 1e-5),
    pytest.param("cuda", torch.bfloat16, 2e-2, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the varlen / flash path needs a CUDA GPU; none is visible")),
]


def naive(q, k, v, lens, causal):
    """Per sequence: softmax(q k^T / sqrt(D)) v in float64, GQA by repeating k and v."""
    rep = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lens:
        qs, ks, vs = (x[start: start + n].double().transpose(0, 1) for x in (q, k, v))  # [h, n, D]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        scores = qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1).to(q.device), float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("device, dtype, tol", CASES)
@pytest.mark.parametrize("lens", [[37], [48, 48, 48], [1, 64, 5, 130], [200, 3, 3],
                                  [30, 29, 28, 27], [9, 10, 11]])  # the last two: one padded group, mixed lengths
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_varlen_attention_matches_per_sequence(device, dtype, tol, lens, causal, heads):
    g = torch.Generator().manual_seed(sum(lens) * 7 + causal + heads[1])
    T, D = sum(lens), 64
    q = torch.randn(T, heads[0], D, generator=g).to(device, dtype)
    k = torch.randn(T, heads[1], D, generator=g).to(device, dtype)
    v = torch.randn(T, heads[1], D, generator=g).to(device, dtype)
    got = varlen_attention(q, k, v, AttentionPlan.for_lengths(lens, device), causal)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), naive(q, k, v, lens, causal), atol=tol, rtol=0)


def test_mixed_length_groups_exist_in_the_cases_above():
    """The padded path's key mask only matters when one group holds several lengths."""
    from rematch_fast.model.batch import length_groups

    for lens in ([30, 29, 28, 27], [9, 10, 11]):
        assert length_groups(lens) == [(0, len(lens), max(lens))]


def test_length_groups_bound_padding_and_cover_every_sequence():
    from rematch_fast.model.batch import length_groups

    assert length_groups([128] * 50) == [(0, 50, 128)]  # equal lengths: one call
    lens = [292, 280, 250, 231, 200, 170, 120, 90, 60, 52, 17, 3]
    groups = length_groups(lens)
    assert [a for a, _, _ in groups] == [0] + [b for _, b, _ in groups[:-1]] and groups[-1][1] == len(lens)
    for a, b, n in groups:
        assert n == max(lens[a:b])
        assert b - a == 1 or (b - a) * n**2 <= 1.25 * sum(x * x for x in lens[a:b])


def test_the_plan_builds_its_padding_once_for_all_layers(tiny_paths, monkeypatch):
    """Length groups and padding indices come from the batch's plan, computed on first use and
    shared by every layer (not rebuilt per layer)."""
    from rematch_fast import ReMatch
    from rematch_fast.model import batch

    m = ReMatch.from_pretrained(tiny_paths["qwen2-vl"], backend="fast", share_prefix=False)
    calls = []
    real = batch.length_groups
    monkeypatch.setattr(batch, "length_groups", lambda lens, *a: calls.append(lens) or real(lens, *a))
    m.embed(["a short text", "a much longer text about rivers and bread " * 4, "x"], batch_size=3)
    assert len(m.backend.model.decoder.layers) > 1 and len(calls) == 1  # one batch: one plan
