"""Mutation check: do the existing tests catch realistic one-line bugs?

Each mutant below is one small, plausible edit (a wrong sign, an off-by-one, a swapped index, a
dropped check...) in one area of rematch_fast, with the few test selections that should fail
because of it. For every mutant the script copies the package into a fresh temporary folder
(rematch_fast/, with kernels/ and export/ placed inside it as setup.py installs them, plus tests/
and pyproject.toml for pytest's settings), applies the edit there, and runs

    python -m pytest -x -q -p no:cacheprovider <selections>

in that copy, with the copy first on PYTHONPATH so that the copy is imported, not the installed
package. The repository itself is never modified.

    caught    pytest exited 1: some selected test failed or errored
    survived  pytest exited 0: the tests do not notice the bug (a gap in the tests, or an
              equivalent mutant that should be removed from the list)
    broken    any other exit status (collection error, no test selected, timeout...): the
              mutant list is out of date, not a kill

Before any mutant, the union of all selections runs once on an unmutated copy and must pass, so
a kill really comes from the mutant. Every mutant's old text must occur exactly once in its file:
when the code changes, the script stops and names the mutants to update.

Run from the repository root, with the virtual environment active:

    python tests/mutation/check.py              # all mutants, 2 at a time
    python tests/mutation/check.py --jobs 4     # more workers
    python tests/mutation/check.py --only pool  # mutants whose name contains "pool"
    python tests/mutation/check.py --list       # print the mutants and exit

Exit status: 0 when every mutant is caught, 1 when any survived or is broken, 2 when the check
itself cannot run (out-of-date mutant list, the copy imports the wrong package, a failing baseline).
This file is not named test_*.py, so pytest never collects it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# setup.py installs these top-level folders inside the package
INSIDE_PACKAGE = {"kernels": "rematch_fast/kernels", "export": "rematch_fast/export"}
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache", "mutation")


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    file: str  # repo-relative, as in the repository
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]  # pytest selections that should fail


def M(name: str, area: str, file: str, old: str, new: str, *tests: str) -> Mutant:
    return Mutant(name, area, file, old, new, tests)


T_POOL = "tests/kernels/test_pooling.py::test_packed_layout"
T_VARLEN = "tests/test_attention.py::test_varlen_attention_matches_per_sequence"
T_GROUPS = "tests/test_attention.py::test_length_groups_bound_padding_and_cover_every_sequence"
T_CASCADE = "tests/test_matching.py::test_cascade_equals_attention_over_the_concatenation"
T_MERGE = "tests/test_matching.py::test_merge_state_kernel_equals_the_reference"
T_POSITIONS = "tests/test_positions.py::test_match_and_embed_positions_equal_transformers"
T_INT8 = "tests/test_search.py::test_int8_index_recall"
T_SCHED = "tests/test_scheduler.py"
T_REF_EMBED = "tests/test_reference.py::test_embedding_equals_independent_computation"
T_HD = "tests/test_hostile_data.py::"
T_CLI = "tests/test_hostile_cli.py::"
T_SWIGLU = "tests/kernels/test_swiglu_gemm.py"
T_CORPUS = "tests/test_corpus.py::"

MUTANTS: list[Mutant] = [
    # -- pooling: E* = mean of the last K rows, stored as unit * norm ------------------------------------------
    M("pool-sum-not-mean", "pooling", "rematch_fast/ops.py",
      "pooled = hidden[rows].float().mean(dim=1)", "pooled = hidden[rows].float().sum(dim=1)", T_POOL),
    M("pool-rows-off-by-one", "pooling", "rematch_fast/ops.py",
      "return cu_seqlens[1:, None].long() - K + torch.arange(K",
      "return cu_seqlens[1:, None].long() - K - 1 + torch.arange(K", T_POOL),
    M("pool-kernel-skips-last-row", "pooling", "kernels/pooling.py",
      "for i in range(K):", "for i in range(K - 1):", T_POOL),
    M("pool-kernel-norm-without-sqrt", "pooling", "kernels/pooling.py",
      "norm = tl.sqrt(tl.sum(mean * mean, axis=0))", "norm = tl.sum(mean * mean, axis=0)", T_POOL),

    # -- attention: padded varlen SDPA, cascade (prefix + suffix), merge of partial states ----------------------
    M("groups-longest-is-last", "attention", "rematch_fast/model/batch.py",
      "longest, work = max(longest, n), work + n * n", "longest, work = n, work + n * n", T_GROUPS, T_VARLEN),
    M("padding-left-aligned", "attention", "rematch_fast/model/batch.py",
      "pos = torch.cat([torch.arange(n) for n in lens])", "pos = torch.cat([torch.arange(-n, 0) for n in lens])",
      T_VARLEN),
    M("sdpa-mask-one-pad-key", "attention", "rematch_fast/model/attention.py",
      "[None, :] < lens[:, None]", "[None, :] <= lens[:, None]", T_VARLEN),
    M("sdpa-mask-dropped", "attention", "rematch_fast/model/attention.py",
      "mask = None if causal else keep[a:b, None, None, :n]", "mask = None", T_VARLEN),
    M("cascade-suffix-not-causal", "attention", "rematch_fast/model/cascade.py",
      "for x in (qp, kp, vp)), causal=True)", "for x in (qp, kp, vp)), causal=False)", T_CASCADE),
    M("cascade-lse-swapped", "attention", "rematch_fast/model/cascade.py",
      "merge_state(o_p.to(q.dtype), lse_p, o_s.to(q.dtype), lse_s)",
      "merge_state(o_p.to(q.dtype), lse_s, o_s.to(q.dtype), lse_p)", T_CASCADE),
    M("merge-torch-weight-sign", "attention", "rematch_fast/ops.py",
      "wa, wb = torch.exp(la - m), torch.exp(lb - m)", "wa, wb = torch.exp(la - m), torch.exp(m - lb)", T_MERGE),
    M("merge-kernel-lse-b-strides-of-a", "attention", "kernels/merge_state.py",
      "lb = tl.load(lb_ptr + t * lb_t + h * lb_h", "lb = tl.load(lb_ptr + t * la_t + h * la_h", T_MERGE),
    M("merge-kernel-lse-without-max", "attention", "kernels/merge_state.py",
      "tl.store(l_ptr + t * H + h, m + tl.log(total), mask=h_ok)",
      "tl.store(l_ptr + t * H + h, tl.log(total), mask=h_ok)", T_MERGE),

    # -- positions: M-RoPE (t, h, w) of text, images and shared-prefix suffixes --------------------------------
    M("mrope-image-advances-by-count", "positions", "rematch_fast/sequence.py",
      "self.next_pos += max(t, gh, gw)", "self.next_pos += t * gh * gw", T_POSITIONS),
    M("mrope-image-axes-swapped", "positions", "rematch_fast/sequence.py",
      "torch.stack([tt, hh, ww])", "torch.stack([tt, ww, hh])", T_POSITIONS),
    M("mrope-suffix-restarts-at-0", "positions", "rematch_fast/sequence.py",
      "b = _Builder(self.images.merge_size, next_pos)", "b = _Builder(self.images.merge_size)", T_POSITIONS),
    M("mrope-sections-all-temporal", "positions", "rematch_fast/model/decoder.py",
      "angles = torch.cat([p[i] for i, p in enumerate(parts)], dim=-1)",
      "angles = torch.cat([p[0] for p in parts], dim=-1)",
      "tests/test_fast.py::test_embeddings_match_reference[qwen2-vl-query-image only]"),

    # -- search keys: order-preserving score bits | (2^32 - 1 - row), in torch and in the kernel ----------------
    M("keys-negative-zero-kept", "search keys", "rematch_fast/similarity.py",
      "bits = (scores.float() + 0.0).view(torch.int32)", "bits = scores.float().view(torch.int32)",
      "tests/test_search.py"),
    M("keys-unpack-row-not-inverted", "search keys", "rematch_fast/similarity.py",
      "return bits.view(torch.float32), _LOW - (keys & _LOW)", "return bits.view(torch.float32), keys & _LOW",
      "tests/test_search.py::test_packing_round_trips_every_sign"),
    M("keys-boundary-tie-missed", "search keys", "rematch_fast/similarity.py",
      "tied = (s >= vals[:, -1:]).sum(dim=1) > kk", "tied = (s > vals[:, -1:]).sum(dim=1) > kk",
      "tests/test_search.py::test_ties_go_to_the_lower_row"),
    M("kernel-keys-ties-to-higher-row", "search keys", "kernels/_scoring.py",
      "(0xFFFFFFFF - cols)", "(cols)", "tests/kernels/test_similarity.py::test_ties_break_to_the_lower_row"),
    M("kernel-keys-sign-not-flipped", "search keys", "kernels/_scoring.py",
      "ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)", "ordered = bits",
      "tests/kernels/test_similarity.py::test_kernel_orders_negative_and_zero_scores"),
    M("kernel-splits-merged-unpermuted", "search keys", "kernels/similarity.py",
      "keys = out.permute(1, 0, 2).reshape(Q, splits * BN)", "keys = out.reshape(Q, splits * BN)",
      "tests/kernels/test_similarity.py::test_ties_break_to_the_lower_row"),

    # -- quantization: per-row symmetric int8 corpus, fp16 queries -------------------------------------------------
    M("int8-scale-without-abs", "quantization", "rematch_fast/similarity.py",
      "scale = x.abs().amax(dim=1) / 127.0", "scale = x.amax(dim=1) / 127.0", T_INT8),
    M("int8-truncated-not-rounded", "quantization", "rematch_fast/similarity.py",
      "q = torch.round(x / scale[:, None]).clamp_(-127, 127)", "q = (x / scale[:, None]).clamp_(-127, 127)", T_INT8),
    M("int8-queries-in-bf16", "quantization", "rematch_fast/similarity.py",
      "return torch.float16  # exact for int8 and e4m3 values", "return torch.bfloat16  # exact for int8 and e4m3 values",
      T_INT8,
      "tests/kernels/test_similarity.py::test_int8_corpus_matches_reference_and_recall"),
    M("index-queries-cast-to-storage", "quantization", "rematch_fast/index.py",
      "q = q.to(self.device, compute_dtype(self.dtype))", "q = q.to(self.device, self.dtype)", T_INT8),

    # -- scheduling: token-budget batches, longest first ---------------------------------------------------------
    M("sched-shortest-first", "scheduling", "rematch_fast/scheduler.py",
      "order.sort(key=lambda i: -lengths[i])", "order.sort(key=lambda i: lengths[i])", T_SCHED),
    M("sched-max-items-off-by-one", "scheduling", "rematch_fast/scheduler.py",
      "len(cur) >= max_items", "len(cur) > max_items", T_SCHED),
    M("sched-padded-cost-off-by-one", "scheduling", "rematch_fast/scheduler.py",
      "cost = (len(cur) + 1) * max(longest, n) if padded", "cost = len(cur) * max(longest, n) if padded", T_SCHED),

    # -- templates: prompt templates, tokenizer views, preprocessor ---------------------------------------------
    M("tokenizer-text-parses-specials", "templates", "rematch_fast/tokenizer.py",
      "self.text.encode_special_tokens = True", "self.text.encode_special_tokens = False",
      "tests/test_tokenizer.py::test_item_text_cannot_inject_special_tokens"),
    M("truncate-at-the-limit", "templates", "rematch_fast/sequence.py",
      "truncated = len(ids) > self.config.max_text_tokens", "truncated = len(ids) >= self.config.max_text_tokens",
      "tests/test_inputs.py::test_long_text_is_truncated_with_a_warning"),
    M("instructions-swapped", "templates", "rematch_fast/config.py",
      'return self.query_instruction if side == "query" else self.document_instruction',
      'return self.query_instruction if side == "document" else self.document_instruction', T_REF_EMBED),
    M("embed-template-no-final-newline", "templates", "rematch_fast/config.py",
      r'{item}<|im_end|>\n<|im_start|>assistant\n"', r'{item}<|im_end|>\n<|im_start|>assistant"', T_REF_EMBED),

    # -- CLI: exit codes, usage checks, overwrite checks ---------------------------------------------------------
    M("cli-k-zero-accepted", "cli", "rematch_fast/cli.py",
      'if getattr(args, "k", 1) < 1:', 'if getattr(args, "k", 1) < 0:',
      T_CLI + "test_bad_values_exit_2_before_any_work"),
    M("cli-files-overwritten", "cli", "rematch_fast/cli.py",
      "        if not overwrite:\n", '        if not overwrite and kind == "folder":\n',
      T_CLI + "test_existing_outputs_need_overwrite"),
    M("cli-rejects-exit-0", "cli", "rematch_fast/cli.py",
      "return EXIT_REJECTS if rejects else EXIT_OK", "return EXIT_OK",
      T_CLI + "test_stale_rejects_are_not_left_behind"),
    M("cli-rejects-may-replace-corpus", "cli", "rematch_fast/cli.py",
      'for k in ("corpus", "queries", "hits")', 'for k in ("queries", "hits")',
      T_CLI + "test_rejects_may_not_overwrite_an_input_or_the_output"),
    M("cli-init-tiny-replaces-any-folder", "cli", "rematch_fast/folders.py",
      "if out.is_symlink() or not (out / marker).is_file():", "if out.is_symlink():",
      T_CLI + "test_init_tiny_overwrite_replaces_only_a_checkpoint"),

    # -- store: fingerprint, ids and value checks of embedding folders ------------------------------------------
    M("store-fingerprint-read-from-checkpoint", "store", "rematch_fast/store.py",
      'meta.get("fingerprint", ""))', 'meta.get("checkpoint", ""))', T_HD + "test_store_round_trip"),
    M("store-norm-not-checked", "store", "rematch_fast/store.py",
      "bad = ~torch.isfinite(unit).all(dim=1) | ~torch.isfinite(norm)", "bad = ~torch.isfinite(unit).all(dim=1)",
      T_HD + "test_non_finite_values_are_refused_on_save"),
    M("store-save-trusts-ids", "store", "rematch_fast/store.py",
      'check_ids(self.ids, f"{folder}: {IDS}")', "self.ids = list(self.ids)",
      T_HD + "test_store_ids_are_checked_on_construction_and_save"),

    # -- search by threshold compaction (k past the fused kernel's 1024) -----------------------------------------
    M("threshold-keeps-rows-past-the-corpus", "search", "kernels/threshold_topk.py",
      "keep = (_pack(acc, cols) >= thr[:, None]) & q_ok[:, None] & c_ok[None, :]",
      "keep = (_pack(acc, cols) >= thr[:, None]) & q_ok[:, None]",
      "tests/kernels/test_threshold_topk.py::test_keys_equal_the_reference"),
    M("kernel-tile-scale-dropped", "search", "kernels/_scoring.py",
      "acc = acc * tl.load(scale_ptr + cols, mask=c_ok, other=0.0)[None, :]", "acc = acc",
      "tests/kernels/test_threshold_topk.py::test_int8_corpus_with_row_scales",
      "tests/kernels/test_similarity.py::test_fp8_corpus_equals_the_reference"),

    # -- corpus scale: tasks, resume, the sharded store, search over its shards ------------------------------------
    M("corpus-task-one-row-too-many", "corpus", "rematch_fast/corpus.py",
      "if len(rows) == shard_rows:", "if len(rows) > shard_rows:",
      T_CORPUS + "test_embed_writes_a_sharded_store_equal_to_encode"),
    M("corpus-resume-trusts-the-corpus", "corpus", "rematch_fast/corpus.py",
      'if info["digest"] != task.digest():', "if False:",
      T_CORPUS + "test_resume_refuses_another_job_or_a_changed_corpus"),
    M("corpus-job-ignores-dtype", "corpus", "rematch_fast/corpus.py",
      'return [k for k in mine if k != "checkpoint" and mine[k] != other.get(k)]',
      'return [k for k in mine if k not in ("checkpoint", "dtype") and mine[k] != other.get(k)]',
      T_CORPUS + "test_resume_refuses_another_job_or_a_changed_corpus"),
    M("shards-int8-scale-dropped", "corpus", "rematch_fast/shards.py",
      "return unit.float() * scale[:, None] if scale is not None else unit.float()", "return unit.float()",
      T_CORPUS + "test_store_dtypes_keep_the_vectors"),
    M("index-shard-rows-kept-local", "corpus", "rematch_fast/index.py",
      "keys = self._topk(q, shard, min(k, shard.shape[0]), scale, chunk) - start",
      "keys = self._topk(q, shard, min(k, shard.shape[0]), scale, chunk)",
      T_CORPUS + "test_index_over_a_sharded_store_equals_one_over_its_rows"),
    M("index-blocks-restart-at-row-0", "corpus", "rematch_fast/index.py",
      "start += data.shape[0]", "start += 0", T_CORPUS + "test_index_over_a_sharded_store_equals_one_over_its_rows"),

    # -- JSONL reader ----------------------------------------------------------------------------------------------
    M("jsonl-bom-on-any-line", "jsonl", "rematch_fast/jsonl.py",
      "body = line[3:] if n == 1 and line.startswith(_BOM) else line",
      "body = line[3:] if line.startswith(_BOM) else line", T_HD + "test_a_bom_after_the_first_line_is_a_bad_row"),
    M("jsonl-byte-offset-within-line", "jsonl", "rematch_fast/jsonl.py",
      "invalid UTF-8 at byte {start + e.start} of the file", "invalid UTF-8 at byte {e.start} of the file",
      T_HD + "test_json_lines_reports_bad_lines_as_json_decode_errors"),
    M("jsonl-nan-accepted", "jsonl", "rematch_fast/jsonl.py",
      "json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_no_constant)",
      "json.loads(raw, object_pairs_hook=_unique_keys)", T_HD + "test_malformed_lines_are_rejected_not_raised"),
    M("jsonl-image-root-not-resolved", "jsonl", "rematch_fast/jsonl.py",
      "resolved = (root / image).resolve()", "resolved = root / image",
      T_HD + "test_image_paths_are_confined_to_the_image_root"),

    # -- quantized weights and exported graphs ---------------------------------------------------------------------
    M("int8-weight-scale-off", "quant", "rematch_fast/model/quant.py",
      "scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127", "scale = w.abs().amax(dim=1).clamp_min(1e-12) / 128",
      "tests/test_quant.py::test_a_quantized_layer_is_within_half_a_step_and_keeps_its_parts"),
    M("nf4-cpu-kernel-trusted-off-block", "quant", "rematch_fast/model/quant.py",
      'if x.device.type == "cpu" and self.in_features % NF4_BLOCK and self.in_features % 2 == 0:', "if False:",
      "tests/test_quant.py::test_every_format_stores_its_layout_and_multiplies_like_its_reference"),
    M("nf4-nibbles-swapped", "quant", "rematch_fast/model/quant.py",
      "torch.stack([layer.weight.view(-1) >> 4, layer.weight.view(-1) & 15], dim=1)",
      "torch.stack([layer.weight.view(-1) & 15, layer.weight.view(-1) >> 4], dim=1)",
      "tests/test_quant.py::test_nf4_reference_reads_bitsandbytes_own_format"),
    M("llm-int8-without-outlier-columns", "quant", "rematch_fast/model/quant.py",
      "ops.int8_vectorwise_quant(xh, BNB_THRESHOLD)", "ops.int8_vectorwise_quant(xh, 0.0)",
      "tests/test_quant.py::test_every_format_stores_its_layout_and_multiplies_like_its_reference"),
    M("vision-segments-attend-padding", "export", "export/onnx.py",
      "keep = torch.zeros(S, L, dtype=torch.bool)", "keep = torch.ones(S, L, dtype=torch.bool)",
      "tests/test_export.py::test_the_vision_graph_at_new_grids"),
    M("prefix-graph-hides-the-prefix", "export", "export/onnx.py",
      "seen = torch.ones(B, 1, S, prefix[0].shape[2], dtype=torch.bool, device=x.device)",
      "seen = torch.zeros(B, 1, S, prefix[0].shape[2], dtype=torch.bool, device=x.device)",
      "tests/test_export.py::test_many_queries_share_batches_through_the_prefix_graphs"),
    M("qkv-rope-k-heads-offset", "kernels", "kernels/rope.py",
      "    hk = h - HQ\n", "    hk = h - HQ + 1\n",
      "tests/kernels/test_elementwise.py::test_qkv_rope"),
    M("qkv-rope-v-rotated", "kernels", "kernels/rope.py",
      "tl.store(v, x1, mask=is_v)", "tl.store(v, r1, mask=is_v)",
      "tests/kernels/test_elementwise.py::test_qkv_rope"),
    M("silu-mul-gate-not-rounded", "kernels", "kernels/silu_mul.py",
      "s = (g * tl.sigmoid(g)).to(u.dtype).to(tl.float32)", "s = g * tl.sigmoid(g)",
      "tests/test_fast.py::test_triton_kernels_in_bf16_round_as_their_references"),
    M("swiglu-gemm-up-rows-by-column-stride", "kernels", "kernels/swiglu_gemm.py",
      "rows_key, I * weight.stride(0),", "rows_key, I * weight.stride(1),", T_SWIGLU),
    M("swiglu-gemm-group-row-by-division", "kernels", "kernels/swiglu_gemm.py",
      "pid_m = first_m + (pid % per_group) % rows_in_group", "pid_m = first_m + (pid % per_group) // rows_in_group",
      T_SWIGLU),
    M("swiglu-gemm-last-k-step-unmasked", "kernels", "kernels/swiglu_gemm.py",
      "k_ok = rk < K - k * BK\n                a = tl.load(x_at, mask=k_ok[None, :], other=0.0)\n                g =",
      "k_ok = rk < K\n                a = tl.load(x_at, mask=k_ok[None, :], other=0.0)\n                g =", T_SWIGLU),
    M("swiglu-gemm-one-dot-last-k-step-unmasked", "kernels", "kernels/swiglu_gemm.py",
      "k_ok = rk < K - k * BK\n                a = tl.load(x_at, mask=k_ok[None, :], other=0.0)\n                w =",
      "k_ok = rk < K\n                a = tl.load(x_at, mask=k_ok[None, :], other=0.0)\n                w =", T_SWIGLU),
    M("swiglu-gemm-one-dot-first-up-column-off-by-one", "kernels", "kernels/swiglu_gemm.py",
      "is_up = (c >= BN).to(tl.int64)", "is_up = (c > BN).to(tl.int64)", T_SWIGLU),
    M("swiglu-gemm-one-dot-up-takes-gate-bias", "kernels", "kernels/swiglu_gemm.py",
      "tl.load(b_ptr + cn_in + is_up * I)", "tl.load(b_ptr + cn_in)", T_SWIGLU),
    M("swiglu-gemm-tuned-reduction-never-masked", "kernels", "kernels/swiglu_gemm.py",
      'triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})',
      'triton.heuristics({"EVEN_K": lambda args: True})', T_SWIGLU),
    M("swiglu-gemm-chosen-tiles-reduction-never-masked", "kernels", "kernels/swiglu_gemm.py",
      'EVEN_K=D % config.kwargs["BK"] == 0', "EVEN_K=True", T_SWIGLU),
    M("swiglu-gemm-up-takes-gate-bias", "kernels", "kernels/swiglu_gemm.py",
      "tl.load(b_ptr + I + rn_in)", "tl.load(b_ptr + rn_in)", T_SWIGLU),
    M("mlp-never-hands-its-weight-to-swiglu-gemm", "kernels", "rematch_fast/model/layers.py",
      "if self.ops.swiglu_gemm is not None and isinstance(gate_up, nn.Linear):",
      "if self.ops.swiglu_gemm is not None and isinstance(gate_up, FusedLinear) and gate_up.bias is not None:",
      "tests/test_ops.py::test_dense_mlps_take_the_swiglu_gemm_and_others_the_gate_alone"),
    M("eager-on-cuda-always-dispatches", "kernels", "rematch_fast/ops.py",
      "if args[0].is_cuda and not torch.compiler.is_compiling():", "if False:",
      "tests/test_ops.py::test_eager_calls_reach_the_cuda_kernel_directly_and_traced_calls_the_custom_op"),
    M("eager-on-cuda-while-compiling", "kernels", "rematch_fast/ops.py",
      "if args[0].is_cuda and not torch.compiler.is_compiling():", "if args[0].is_cuda:",
      "tests/test_ops.py::test_eager_calls_reach_the_cuda_kernel_directly_and_traced_calls_the_custom_op"),
    M("transfer-slots-unaligned", "pipeline", "rematch_fast/transfer.py",
      "end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN", "end += t.numel() * t.element_size()",
      "tests/test_transfer.py::test_pack_then_unpack_gives_back_every_tensor"),
    M("batch-stream-submits-partial-batches", "pipeline", "rematch_fast/pipeline.py",
      "        self.pool = batches.pop() if batches else []\n", "        self.pool = []\n",
      "tests/test_pipeline.py::test_a_chunks_last_partial_batch_is_filled_from_the_next_chunk"),
    M("in-flight-one-batch-short", "pipeline", "rematch_fast/pipeline.py",
      "while len(self.waiting) > self.depth:", "while len(self.waiting) >= self.depth:",
      "tests/test_pipeline.py::test_chunk_boundaries_do_not_drain_the_device"),
    M("match-reads-each-batch-at-once", "pipeline", "rematch_fast/api.py",
      "            queue = InFlight()\n", "            queue = InFlight(depth=0)\n",
      "tests/test_matching.py::test_match_batches_stay_queued_before_a_result_is_read"),
    M("packed-batch-readout-not-offset", "model", "rematch_fast/model/batch.py",
      "readout=torch.stack([start + s.readout for start, s in zip(starts, seqs)]),",
      "readout=torch.stack([s.readout for start, s in zip(starts, seqs)]),",
      "tests/test_transfer.py::test_packed_batch_matches_the_sequences_it_packs"),
    M("single-query-continues-the-prefix", "model", "rematch_fast/backends/fast.py",
      "if len(seqs) == 1 and self.latency is not None", "if False and self.latency is not None",
      "tests/test_fast.py::test_latency_buckets_give_the_same_embeddings"),
    M("compiled-layers-record-the-prefix-in-traced-code", "model", "rematch_fast/model/decoder.py",
      "        attn = _attention(q, k, v, plan, prefix, self.merge_state, capture)\n",
      "        capture is not None and capture.layers.append((k, v))\n"
      "        attn = _attention(q, k, v, plan, prefix, self.merge_state, None)\n",
      "tests/test_fast.py::test_compiled_layers_equal_the_hand_fused_ones"),
    M("static-padding-one-dummy-past-the-longest", "model", "rematch_fast/backends/packed_graphs.py",
      "bounds.append(min(tokens, bounds[-1] + longest))", "bounds.append(tokens)",
      "tests/test_packed_graphs.py::test_static_layout"),
    M("graph-replayed-without-its-batch", "model", "rematch_fast/backends/packed_graphs.py",
      "        s = self.graphs[key]\n        self._fill(s, batch, embeds, bounds)\n", "        s = self.graphs[key]\n",
      "tests/test_packed_graphs.py::test_capture_and_replay_bookkeeping"),
    M("graph-captured-at-a-shapes-first-batch", "model", "rematch_fast/backends/packed_graphs.py",
      "self.seen[key] >= 2", "self.seen[key] >= 1",
      "tests/test_packed_graphs.py::test_capture_and_replay_bookkeeping"),
    M("static-positions-not-written", "model", "rematch_fast/backends/packed_graphs.py",
      "        s[\"positions\"][:, :T].copy_(batch.positions)\n", "",
      "tests/test_packed_graphs.py::test_static_shapes_give_the_same_embeddings"),
]


# -- the copy ---------------------------------------------------------------------------------------------------
def copy_path(file: str) -> str:
    """Where a repo-relative file lives in the copy (kernels/ and export/ sit inside the package)."""
    top, _, rest = file.partition("/")
    return f"{INSIDE_PACKAGE[top]}/{rest}" if top in INSIDE_PACKAGE and rest else file


def make_copy(dest: Path) -> None:
    shutil.copytree(ROOT / "rematch_fast", dest / "rematch_fast", ignore=IGNORED)
    for top, inside in INSIDE_PACKAGE.items():
        shutil.copytree(ROOT / top, dest / inside, ignore=IGNORED)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=IGNORED)  # with tests/data
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")  # pytest's settings


def env_for(copy: Path, tmp: Path, threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["TMPDIR"] = str(tmp)  # each run's pytest and tempfile folders stay inside its own work folder
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(threads))  # parallel runs would oversubscribe the cores
    return env


class Workspace:
    """A temporary folder holding a copy (`repo`) and that copy's TMPDIR (`tmp`)."""

    def __init__(self, tag: str):
        self.root = Path(tempfile.mkdtemp(prefix=f"rematch-mutant-{tag}-"))
        self.repo, self.tmp = self.root / "repo", self.root / "tmp"
        self.tmp.mkdir()
        make_copy(self.repo)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# -- checks before any run ------------------------------------------------------------------------------------------
def validate(mutants: list[Mutant]) -> list[str]:
    """Problems of the list against the repository as it is now (empty when it is in sync)."""
    problems, names = [], set()
    for m in mutants:
        if m.name in names:
            problems.append(f"{m.name}: duplicate name")
        names.add(m.name)
        path = ROOT / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        count = path.read_text(encoding="utf-8").count(m.old)
        if count != 1:
            problems.append(f"{m.name}: old text occurs {count} times in {m.file} (must be exactly once): {m.old!r}")
        if m.old == m.new:
            problems.append(f"{m.name}: old and new text are the same")
        if not m.tests:
            problems.append(f"{m.name}: no test selection")
    return problems


def check_imports(ws: Workspace, threads: int) -> str | None:
    """None when the copy's package (and its kernels) are what Python imports there; else why not."""
    code = "import rematch_fast, rematch_fast.kernels.pooling as p; print(rematch_fast.__file__); print(p.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ws.repo, env=env_for(ws.repo, ws.tmp, threads),
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"importing in the copy failed:\n{r.stderr.strip()}"
    files = [Path(f).resolve() for f in r.stdout.splitlines() if f]
    outside = [f for f in files if not f.is_relative_to(ws.repo.resolve())]
    if len(files) != 2 or outside:
        return f"the copy at {ws.repo} imports {', '.join(map(str, files))}: not the copy's package"
    return None


def union(selections) -> list[str]:
    """All selections once, dropping those a broader one already holds (a file, or a test's every parameter)."""
    unique = list(dict.fromkeys(selections))
    return [s for s in unique
            if not any(o != s and (s.startswith(o + "::") or s.startswith(o + "[")) for o in unique)]


# -- running ---------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    mutant: Mutant
    status: str  # caught | survived | broken
    seconds: float
    detail: str
    output: str


def pytest(ws: Workspace, selections, threads: int, timeout: float) -> tuple[int | None, str]:
    """(exit status or None on timeout, output) of pytest on `selections` in the copy."""
    try:
        r = subprocess.run([sys.executable, *PYTEST, *selections], cwd=ws.repo, env=env_for(ws.repo, ws.tmp, threads),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out
    return r.returncode, r.stdout + r.stderr


def first_failure(output: str) -> str:
    """The first FAILED/ERROR node of pytest's short summary (addopts -ra), for the table."""
    found = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, re.MULTILINE)  # node ids may hold spaces
    return found.group(1) if found else ""


def run_mutant(m: Mutant, threads: int, timeout: float) -> Result:
    start = time.monotonic()
    ws = Workspace(m.name)
    try:
        target = ws.repo / copy_path(m.file)
        text = target.read_text(encoding="utf-8")
        if text.count(m.old) != 1:  # the file changed since validation
            return Result(m, "broken", time.monotonic() - start, "old text not found once in the copy", "")
        target.write_text(text.replace(m.old, m.new), encoding="utf-8")
        rc, out = pytest(ws, m.tests, threads, timeout)
    finally:
        ws.close()
    seconds = time.monotonic() - start
    if rc == 1:
        return Result(m, "caught", seconds, first_failure(out), out)
    if rc == 0:
        return Result(m, "survived", seconds, "all selected tests passed", out)
    return Result(m, "broken", seconds, f"timeout after {timeout:.0f} s" if rc is None else f"pytest exit {rc}", out)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


def print_table(results: list[Result]) -> None:
    rows = [(r.mutant.name, r.mutant.area, r.status, f"{r.seconds:.1f}", r.detail) for r in results]
    head = ("mutant", "area", "result", "s", "detail (first failing test)")
    widths = [max(len(row[i]) for row in rows + [head]) for i in range(4)]
    for row in [head] + rows:
        cells = [c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]  # seconds right
        print("  ".join(cells + [row[4]]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="mutants run at once, each in its own copy (default 2)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only mutants whose name contains one of these")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one pytest run may take (default 300)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")

    problems = validate(MUTANTS)
    if problems:
        print("error: the mutant list is out of sync with the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    mutants = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only)]
    if args.list:
        for m in mutants:
            print(f"{m.name}  [{m.area}]  {m.file}\n    - {m.old!r}\n    + {m.new!r}\n    tests: {' '.join(m.tests)}")
        print(f"{len(mutants)} mutants")
        return 0
    if not mutants:
        print(f"error: no mutant name contains any of {args.only}", file=sys.stderr)
        return 2

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    start = time.monotonic()
    ws = Workspace("baseline")
    try:
        why = check_imports(ws, threads)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
        selections = union(s for m in mutants for s in m.tests)
        print(f"baseline: {len(selections)} selections on an unmutated copy ...", flush=True)
        rc, out = pytest(ws, selections, threads, args.timeout * 2)
    finally:
        ws.close()
    if rc != 0:
        print(f"error: the selected tests fail on the unmutated code (pytest exit {rc}); a kill would mean nothing:\n"
              + tail(out, 40), file=sys.stderr)
        return 2
    print(f"baseline passed in {time.monotonic() - start:.0f} s; {len(mutants)} mutants, {args.jobs} at a time",
          flush=True)

    results: dict[str, Result] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_mutant, m, threads, args.timeout) for m in mutants]
        for n, future in enumerate(as_completed(futures), start=1):
            r = future.result()
            results[r.mutant.name] = r
            print(f"[{n}/{len(mutants)}] {r.mutant.name}: {r.status} ({r.seconds:.1f} s)", flush=True)
    ordered = [results[m.name] for m in mutants]
    total = time.monotonic() - start

    print()
    print_table(ordered)
    for r in ordered:
        if r.status != "caught":
            print(f"\n{r.status.upper()}: {r.mutant.name} ({r.mutant.file}): {r.mutant.old!r} -> {r.mutant.new!r}"
                  f"\n  tests: {' '.join(r.mutant.tests)}\n  {r.detail}\n{tail(r.output)}")
    count = {s: sum(r.status == s for r in ordered) for s in ("caught", "survived", "broken")}
    print(f"\ncaught {count['caught']} of {len(ordered)}, survived {count['survived']}, broken {count['broken']}, "
          f"{total:.0f} s")
    return 0 if count["caught"] == len(ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
