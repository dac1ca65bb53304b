"""The gate/up GEMM with SwiGLU in its epilogue against its torch reference (the GEMM, then the gate):
strided and 3-d inputs, sizes that fit no tile (rows, columns and the reduction), bias or none,
several row blocks per program group, fresh random inputs each run. On the CPU the Triton
interpreter runs it in fp32 and fp16 (its bf16 dot is wrong); on a GPU, bf16 at the 3B model's shapes
through the autotuner."""
import random

import pytest
import torch

from rematch_fast import ops

import triton  # noqa: E402 - the test extra installs it: missing, these tests fail rather than skip
from rematch_fast.kernels import swiglu_gemm  # noqa: E402
from rematch_fast.kernels.swiglu_gemm import INTERPRETER_CONFIG, swiglu_gemm_triton, tuned_configs  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # cpu: the Triton interpreter
# fp16 / bf16: the reference rounds the GEMM's output before the gate, the kernel its fp32 accumulators;
# a different summation order moves a rounding boundary now and then: one step of the output's dtype
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16 if CUDA else torch.float16, 1.6e-2)]
SEED = random.randrange(1 << 30)  # fresh inputs every run, printed on failure


def _inputs(M, D, I, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D + 5, generator=g).to(DEVICE, dtype)[:, 3:D + 3]  # rows with a gap between them
    w = torch.randn(2 * I, D, generator=g) / D ** 0.5 * 2  # gate and up of magnitude ~2: silu's curved part
    b = torch.randn(2 * I, generator=g) * 0.5 if bias else None
    return x, w.to(DEVICE, dtype), None if b is None else b.to(DEVICE, dtype)


@pytest.mark.parametrize("one_dot", [False, True], ids=["two dots", "one dot"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("M, D, I, bias", [(1, 64, 32, False), (70, 40, 45, True), (37, 96, 100, False),
                                           (131, 64, 33, True), (5, 33, 17, False)])
def test_swiglu_gemm_equals_the_gemm_then_the_gate(M, D, I, bias, dtype, tol, one_dot, monkeypatch):
    """Both forms of the kernel's reduction (on a GPU the autotuner picks among both)."""
    monkeypatch.setattr(swiglu_gemm, "INTERPRETER_CONFIG",
                        triton.Config({**INTERPRETER_CONFIG.kwargs, "ONE_DOT": one_dot}))
    seed = SEED + M * D + I
    x, w, b = _inputs(M, D, I, dtype, seed, bias)
    got = swiglu_gemm_triton(x, w, b)
    want = ops.swiglu_torch(x, w, b)
    assert got.dtype == dtype and got.shape == (M, I)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}")
    # and against an fp64 computation of its own (the reference's rounding aside)
    gate_up = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    exact = torch.nn.functional.silu(gate_up[:, :I]) * gate_up[:, I:]
    torch.testing.assert_close(got.double(), exact, atol=3 * tol, rtol=3 * tol)


def test_the_interpreter_cases_cover_every_edge():
    """The blocks the CPU runs with: some case spans several row groups with a short last group, a
    partial row tile, a partial column tile and a partial reduction step."""
    b = INTERPRETER_CONFIG.kwargs
    assert b["GROUP_M"] > 1 and -(-131 // b["BM"]) > b["GROUP_M"] and -(-131 // b["BM"]) % b["GROUP_M"]
    assert 45 % b["BN"] and 40 % b["BK"] and 70 % b["BM"]


def test_strided_rows_reach_the_kernel():
    x, _, _ = _inputs(4, 40, 8, torch.float16, SEED, bias=False)
    assert x.stride(0) == 45 and x.stride(1) == 1


@pytest.fixture
def tuning(monkeypatch):
    """The GPU's launch path (autotuning, then the chosen tiles launched directly) under the interpreter:
    Hopper's shared memory, timings made up (the interpreter cannot time), nothing tuned yet."""
    monkeypatch.setattr(swiglu_gemm, "interpreting", lambda: False)
    monkeypatch.setattr(swiglu_gemm, "shared_memory_bytes", lambda device: 232448)
    monkeypatch.setattr(swiglu_gemm, "_chosen", {})
    monkeypatch.setattr(swiglu_gemm._tuned, "cache", {})
    monkeypatch.setattr(swiglu_gemm._tuned, "cache_results", False, raising=False)
    timings = iter(range(100, 0, -1))  # each candidate timed faster than the one before: the last one wins
    benched = []

    def do_bench(fn, quantiles):
        fn()
        benched.append(1)
        t = float(next(timings))
        return [t, t, t]

    monkeypatch.setitem(swiglu_gemm._tuned.__dict__, "do_bench", do_bench)
    return benched


def test_the_gpu_launch_path_tunes_once_then_launches_the_choice(tuning, monkeypatch):
    x, w, b = _inputs(70, 200, 33, torch.float16, SEED + 1, bias=True)
    want = ops.swiglu_torch(x, w, b)
    got = swiglu_gemm_triton(x, w, b)
    torch.testing.assert_close(got.float(), want.float(), atol=1.6e-2, rtol=1.6e-2)
    candidates = swiglu_gemm._worth_trying(swiglu_gemm._configs(), {"x_ptr": x, "M_KEY": 128})
    assert len(tuning) == len(candidates) > 1  # every candidate timed once
    (key, chosen), = swiglu_gemm._chosen.items()
    assert key[:3] == (128, 33, 200) and str(chosen) == str(candidates[-1])  # the fastest
    monkeypatch.setattr(swiglu_gemm._tuned, "run", lambda *a, **k: pytest.fail("tuned again"))
    x2, _, _ = _inputs(99, 200, 33, torch.float16, SEED + 2, bias=False)  # same key: 99 rows round up to 128
    torch.testing.assert_close(swiglu_gemm_triton(x2, w, b).float(), ops.swiglu_torch(x2, w, b).float(),
                               atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.parametrize("config", swiglu_gemm._configs(), ids=str)
def test_every_candidate_tile_is_right_on_awkward_shapes(tuning, config):
    """Each candidate as the autotuner could choose it (the large tiles the interpreter's own never
    reach: 256 rows, a 128-wide reduction step, groups of 8 row blocks), on sizes that fit none."""
    x, w, b = _inputs(300, 200, 33, torch.float16, SEED + 3, bias=True)
    swiglu_gemm._chosen[(512, 33, 200, str(x.dtype), str(x.device))] = config
    got = swiglu_gemm_triton(x, w, b)
    assert not tuning  # launched with the given tiles, nothing timed
    torch.testing.assert_close(got.float(), ops.swiglu_torch(x, w, b).float(), atol=1.6e-2, rtol=1.6e-2)


def test_3d_inputs_and_empty_batches():
    x, w, b = _inputs(12, 48, 20, torch.float32, SEED, bias=True)
    batched = x.reshape(3, 4, 48)
    got = swiglu_gemm_triton(batched, w, b)
    assert got.shape == (3, 4, 20)
    torch.testing.assert_close(got.reshape(12, 20), ops.swiglu_torch(x, w, b), atol=1e-5, rtol=1e-5)
    assert swiglu_gemm_triton(x[:0], w, b).shape == (0, 20)


@pytest.mark.skipif(not CUDA, reason="the autotuned GEMM at the 3B model's sizes needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 300, 4096])
def test_swiglu_gemm_at_3b_shapes_on_cuda(M):
    """Qwen2.5-VL-3B's decoder MLP (D = 2048, I = 11008) in bf16: a single query's rows, a small
    batch, a large one; each row count picks its own autotuned tiles."""
    x, w, _ = _inputs(M, 2048, 11008, torch.bfloat16, SEED + M, bias=False)
    got = swiglu_gemm_triton(x, w)
    want = ops.swiglu_torch(x, w, None)
    torch.testing.assert_close(got.float(), want.float(), atol=1.6e-2, rtol=1.6e-2)
    assert any(key[:3] == (min(1 << (M - 1).bit_length(), 1 << 16), 11008, 2048) for key in tuned_configs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 64, 8192])
@pytest.mark.parametrize("smem", [232448, 166912, 101376])  # Hopper, A100, consumer Ampere/Ada
def test_autotuning_tries_only_tiles_that_fit(monkeypatch, dtype, rows, smem):
    """The autotuner's candidates for a call: pipelined tiles within the GPU's shared memory, row tiles
    no taller than the rows (at least 32), and never none."""
    monkeypatch.setattr(swiglu_gemm, "shared_memory_bytes", lambda device: smem)
    x = torch.empty(4, 8, dtype=dtype)
    kept = swiglu_gemm._worth_trying(swiglu_gemm._configs(), {"x_ptr": x, "M_KEY": rows})
    assert kept
    for c in kept:
        b = c.kwargs
        assert (b["BM"] + 2 * b["BN"]) * b["BK"] * x.element_size() * c.num_stages <= smem
        assert b["BM"] <= max(32, rows)
    if rows == 8192 and dtype == torch.bfloat16 and smem == 232448:
        assert len(kept) == len(swiglu_gemm._configs())  # a large bf16 batch on Hopper: every candidate
