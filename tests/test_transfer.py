"""rematch_fast.transfer: packing a batch's host tensors for one copy, and the copies back.
The pinned, non-blocking CUDA side is checked in test_cuda_fast.py (no host-device sync)."""
import pytest
import torch

from rematch_fast.model.batch import PackedBatch, cu_seqlens_host
from rematch_fast.sequence import Sequence
from rematch_fast.transfer import ALIGN, HostCopy, pack, to_device, unpack


def awkward_tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(-2**40, 2**40, (7,), generator=g),  # int64
        torch.randint(0, 2**31 - 1, (3, 5), generator=g, dtype=torch.int32),
        torch.rand(3, generator=g) > 0.5,  # bool: 3 bytes, the next slot must still be aligned
        torch.randn(2, 3, 5, generator=g).to(torch.bfloat16),
        torch.empty(0, 4),  # empty
        torch.randn(6, 4, generator=g).t(),  # not contiguous
        torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        torch.tensor(3.5, dtype=torch.float64),  # 0-d
    ]


@pytest.mark.parametrize("seed", [0, 11])
def test_pack_then_unpack_gives_back_every_tensor(seed):
    tensors = awkward_tensors(seed)
    buffer, slots = pack(tensors, pin=False)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    starts = [start for start, _, _ in slots]
    assert all(s % ALIGN == 0 for s in starts) and starts == sorted(starts)
    got = unpack(buffer, slots)
    for want, have in zip(tensors, got):
        assert have.dtype == want.dtype and have.shape == want.shape
        assert torch.equal(have, want)
    # the views share the buffer: one copy of it moves every tensor
    assert all(t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for t in got if t.numel())


def test_unpack_reads_a_copy_of_the_buffer_elsewhere():
    tensors = awkward_tensors(5)
    buffer, slots = pack(tensors, pin=False)
    moved = unpack(buffer.clone(), slots)  # what the device receives is a copy of the bytes
    buffer.zero_()
    assert all(torch.equal(a, b) for a, b in zip(moved, tensors))


def test_to_device_off_cuda_is_a_plain_copy():
    tensors = awkward_tensors(3)
    for device in ("cpu", torch.device("cpu"), None):
        got = to_device(tensors, device)
        assert all(torch.equal(a, b) and a.device.type == "cpu" for a, b in zip(got, tensors))
    assert to_device([], "cpu") == []


def test_host_copy_of_host_tensors_hands_them_back():
    t = torch.arange(6.0)
    copy = HostCopy([t, t[:2]])
    assert copy.event is None
    a, b = copy.wait()
    assert a is t and torch.equal(b, t[:2])


def test_host_copy_refuses_tensors_of_several_devices():
    with pytest.raises(ValueError, match="one device"):
        HostCopy([torch.ones(2), torch.ones(2, device="meta")])


def test_cu_seqlens_host():
    assert cu_seqlens_host([3, 1, 4]).tolist() == [0, 3, 4, 8]
    assert cu_seqlens_host([3]).dtype == torch.int32


def make_sequence(n: int, first_id: int, soft: int, image_rows: int, d: int = 4) -> Sequence:
    ids = torch.arange(first_id, first_id + n)
    ids[1:1 + image_rows] = 99  # the image token
    positions = torch.stack([torch.arange(n), torch.arange(n) + 1, torch.arange(n) * 2])
    pixels = torch.randn(image_rows * 4, 6) if image_rows else None
    grid = torch.tensor([[1, 2, 2 * image_rows]]) if image_rows else torch.zeros(0, 3, dtype=torch.long)
    return Sequence(ids, positions, pixels, grid, torch.arange(n - soft, n), torch.randn(soft, d),
                    torch.arange(n - soft, n))


def test_packed_batch_matches_the_sequences_it_packs():
    """Every index the model reads (ids, positions, cu_seqlens, image and soft rows, readout) is the
    sequences' own, offset by where each starts in the packed batch."""
    seqs = [make_sequence(5, 0, 2, 0), make_sequence(9, 100, 2, 3), make_sequence(4, 200, 2, 1)]
    batch = PackedBatch(seqs, torch.device("cpu"), image_token_id=99, prefixes=[(2, 7), (1, 3)])
    starts = [0, 5, 14]
    assert torch.equal(batch.ids, torch.cat([s.input_ids for s in seqs]))
    assert torch.equal(batch.positions, torch.cat([s.positions for s in seqs], dim=1))
    assert batch.plan.cu_seqlens.tolist() == [0, 5, 14, 18] and batch.plan.cu_seqlens.dtype == torch.int32
    assert batch.plan.max_seqlen == 9 and batch.plan.host_lengths() == [5, 9, 4]
    assert batch.image_rows.tolist() == [6, 7, 8, 15]
    assert torch.equal(batch.pixels, torch.cat([seqs[1].pixel_values, seqs[2].pixel_values]))
    assert batch.grids.tolist() == [[1, 2, 6], [1, 2, 2]]
    assert batch.soft_rows.tolist() == [st + r for st, s in zip(starts, seqs) for r in s.soft_positions.tolist()]
    assert torch.equal(batch.soft_embeds, torch.cat([s.soft_embeds for s in seqs]))
    assert batch.readout.tolist() == [[st + r for r in s.readout.tolist()] for st, s in zip(starts, seqs)]
    layout = batch.plan.prefix
    assert layout.q_bounds == [(0, 14), (14, 18)] and layout.k_bounds == [(0, 7), (7, 10)]
    assert layout.cu_q.tolist() == [0, 14, 18] and layout.cu_k.tolist() == [0, 7, 10]


def test_a_text_batch_has_no_image_tensors():
    batch = PackedBatch([make_sequence(3, 0, 1, 0), make_sequence(6, 10, 1, 0)], torch.device("cpu"), 99)
    assert batch.pixels is None and batch.image_rows is None and batch.grids is None and batch.plan.prefix is None
