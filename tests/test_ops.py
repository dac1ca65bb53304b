"""The one dispatch rule: custom ops with a torch reference, a CUDA kernel and a fake; kernels
or references chosen once per model or index; kernels/ files are leaves."""
import ast
import importlib.util
from pathlib import Path

import pytest
import torch

import rematch_fast
from rematch_fast import Index, InputError, ReMatch, ops, similarity

ROOT = Path(__file__).resolve().parents[1]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _op_cases():
    rows = ops.learnable_rows_packed(torch.tensor([0, 12, 30, 47]), 5)
    angles = _rand(9, 8, seed=4) * 20
    angles = torch.cat([angles, angles], dim=-1)
    q, c = _rand(3, 24, seed=5), _rand(70, 24, seed=6)
    c8, scale = similarity.quantize_int8_rows(c)
    return {
        "pool_learnable": (ops.pool_learnable_op, (_rand(47, 32, seed=1), rows)),
        "rms_norm": (ops.rms_norm_op, (_rand(7, 48, seed=2), _rand(48, seed=3), 1e-6)),
        "silu_mul": (ops.silu_mul_op, (_rand(5, 2 * 40, seed=7),)),
        "swiglu_gemm": (ops.swiglu_gemm_op, (_rand(6, 24, seed=14), _rand(2 * 20, 24, seed=15), None)),
        "swiglu_gemm bias 3-d": (ops.swiglu_gemm_op, (_rand(2, 3, 24, seed=16), _rand(2 * 20, 24, seed=17),
                                                      _rand(2 * 20, seed=18))),
        "rope": (ops.rope_op, (_rand(9, 3, 16, seed=8), angles.cos(), angles.sin())),
        "qkv_rope": (ops.qkv_rope_op, (_rand(9, (4 + 2 * 2) * 16, seed=9), angles.cos(), angles.sin(), 4, 2)),
        "qkv_rope one row": (ops.qkv_rope_op, (_rand(1, 3 * 16, seed=10), angles[:1].cos(), angles[:1].sin(), 1, 1)),
        "topk_keys": (similarity.topk_keys_op, (q, c, 10, None, 32)),
        "topk_keys int8": (similarity.topk_keys_op, (q.half(), c8, 10, scale, 32)),
    }


@pytest.mark.parametrize("name", list(_op_cases()))
def test_custom_op_registration_schema_and_fake(name):
    """torch.library's own checks: schema, fake (shapes for compile/export), no aliasing of inputs."""
    op, args = _op_cases()[name]
    torch.library.opcheck(op, args)


def test_custom_ops_equal_their_references_on_the_cpu():
    cases = _op_cases()
    refs = {"pool_learnable": ops.pool_learnable_torch, "rms_norm": ops.rms_norm_torch,
            "silu_mul": ops.silu_mul_torch, "rope": ops.rope_torch, "qkv_rope": ops.qkv_rope_torch,
            "swiglu_gemm": ops.swiglu_torch, "swiglu_gemm bias 3-d": ops.swiglu_torch}
    for name, ref in refs.items():
        op, args = cases[name]
        got, want = op(*args), ref(*args)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(g, w), name
    q, c, k, _, chunk = cases["topk_keys"][1]
    assert torch.equal(similarity.topk_keys_op(q, c, k, None, chunk), similarity.topk_keys_torch(q, c, k, None, chunk))


def test_the_choice_is_made_once_by_device_and_kernels():
    assert ops.select_ops("torch", "cuda") is ops.TORCH_OPS  # the reference's rule, on every device
    assert ops.select_ops("torch", "cpu") is ops.TORCH_OPS
    assert ops.select_ops("auto", torch.device("cuda", 0)) is ops.CUSTOM_OPS
    assert ops.select_ops("auto", "cpu") is ops.TORCH_OPS
    assert ops.select_ops("auto+swiglu-gemm", "cuda") is ops.SWIGLU_GEMM_OPS
    assert ops.select_ops("auto+swiglu-gemm", "cpu") is ops.TORCH_OPS
    mine = ops.Ops("mine", *(lambda *a: None,) * 7)
    assert ops.select_ops(mine, "cpu") is mine
    with pytest.raises(InputError, match="kernels must be one of"):
        ops.select_ops("triton", "cpu")
    assert similarity.select_topk("auto", "cpu") is similarity.topk_keys_torch
    assert similarity.select_topk("torch", "cuda") is similarity.topk_keys_torch
    assert similarity.select_topk("auto", "cuda") is similarity.topk_keys_op


def test_eager_calls_reach_the_cuda_kernel_directly_and_traced_calls_the_custom_op(monkeypatch):
    """kernels="auto" on CUDA: in eager mode the Triton kernel without the dispatcher's round trip,
    under torch.compile the custom op (whose fake the tracer needs), on other devices the op."""
    class OnCuda:
        is_cuda = True

    def op(*args):
        return "custom op"

    monkeypatch.setitem(ops._CUDA_IMPLS, op, lambda *args: "kernel")
    call = ops.eager_on_cuda(op)
    assert call(OnCuda(), 1.0) == "kernel"
    assert call(torch.ones(2)) == "custom op"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert call(OnCuda(), 1.0) == "custom op"
    # every op of the set goes through it, each with its own CUDA implementation
    assert all(ops._CUDA_IMPLS.get(o) for o in (ops.pool_learnable_op, ops.rms_norm_op, ops.silu_mul_op, ops.rope_op,
                                                ops.merge_state_op, ops.add_rms_norm_op, ops.qkv_rope_op))
    x = _rand(4, 2 * 8, seed=12)
    assert torch.equal(ops.CUSTOM_OPS.silu_mul(x), ops.silu_mul_torch(x))  # CPU tensors: the op, its reference
    assert ops._CUDA_IMPLS.get(ops.swiglu_gemm_op)
    h, w, b = _rand(3, 8, seed=19), _rand(2 * 5, 8, seed=20), _rand(2 * 5, seed=21)
    assert torch.equal(ops.SWIGLU_GEMM_OPS.swiglu_gemm(h, w, b), ops.swiglu_torch(h, w, b))
    assert ops.TORCH_OPS.swiglu_gemm is None and ops.CUSTOM_OPS.swiglu_gemm is None  # opt-in only


def test_the_eager_wrappers_trace_whole_under_torch_compile():
    """No graph break: dynamo reads the device and is_compiling() and traces the custom op."""
    f = torch.compile(lambda x: ops.CUSTOM_OPS.silu_mul(x) * 2, backend="aot_eager", fullgraph=True)
    x = _rand(3, 2 * 16, seed=13)
    torch.testing.assert_close(f(x), ops.silu_mul_torch(x) * 2, atol=1e-6, rtol=0)


def test_models_and_indexes_hold_the_ops_they_were_built_with(tiny_paths):
    fast = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], backend="fast", kernels="torch")
    layers = [m for m in fast.backend.model.modules() if hasattr(m, "ops")]
    assert layers and all(m.ops is ops.TORCH_OPS for m in layers)
    with pytest.raises(InputError, match="kernels must be one of"):
        ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], backend="fast", kernels="fastest")
    with pytest.raises(InputError, match="kernels must be one of"):
        Index(torch.randn(4, 8), kernels="cuda")
    with pytest.raises(InputError, match="kernels must be one of"):  # a model's choice, not an index's
        Index(torch.randn(4, 8), kernels="auto+swiglu-gemm")


def test_dense_mlps_take_the_swiglu_gemm_and_others_the_gate_alone(tiny_paths):
    """With a swiglu_gemm op, the decoder's SwiGLU MLPs with dense weights hand it the gate/up weight;
    without one (the default op sets), or with a quantized layer (its own matmul), the gate/up module
    runs (its hooks with it), then ops.silu_mul."""
    from dataclasses import replace

    calls = []

    def spy(name, fn):
        def call(*args):
            calls.append(name)
            return fn(*args)
        return call

    def run(kernels, **options):
        calls.clear()
        m = ReMatch.from_pretrained(tiny_paths["qwen2.5-vl"], backend="fast", kernels=kernels, latency_buckets=(),
                                    **options)
        out = m.embed(["a short text"])
        assert calls and len(calls) % len(m.backend.model.decoder.layers) == 0  # per layer and pass
        return set(calls), out

    gate = spy("silu_mul", ops.silu_mul_torch)
    fused = replace(ops.TORCH_OPS, name="spy", silu_mul=gate, swiglu_gemm=spy("swiglu_gemm", ops.swiglu_torch))
    plain = replace(ops.TORCH_OPS, name="spy", silu_mul=gate)
    (fused_calls, got), (plain_calls, want) = run(fused), run(plain)
    assert fused_calls == {"swiglu_gemm"} and plain_calls == {"silu_mul"}
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert run(fused, quantize="int8-weight")[0] == {"silu_mul"}



def test_kernel_files_are_leaves():
    """kernels/ imports nothing from rematch_fast (no import loop between ops and kernels); kernel
    files share only private helpers (_launch, _scoring)."""
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("rematch_fast"), f"{path.name} imports {node.module}"
                assert node.level == 0 or (node.module or "").startswith("_"), f"{path.name} imports .{node.module}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("rematch_fast") for a in node.names), path.name


def test_search_is_a_function_and_no_module_shadows_it():
    assert callable(rematch_fast.search) and rematch_fast.search is similarity.search
    assert importlib.util.find_spec("rematch_fast.search") is None
    scores, rows = rematch_fast.search(torch.eye(3)[1:], torch.eye(3), k=1)
    assert rows.flatten().tolist() == [1, 2] and torch.allclose(scores, torch.ones(2, 1))
