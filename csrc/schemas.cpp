// The operator contract: every fisheradaptune op's schema, in one place. Each op family has a
// folder, csrc/<family>/ (fisher, drift, tokens, sparse), holding per op (or algorithm) its
// contract header and validation (<op>.h, <op>_args.cpp), its CPU kernel (<op>_cpu.cpp) and its
// CUDA kernel (<op>_cuda.cu). Fake kernels, autograd and the in-place registrations are on the
// Python side (fisheradaptune/).
// The methods behind the ops are specified in docs/methods.md.
#include <Python.h>

#include "common/stable.h"

#include "common/plan.h"

STABLE_TORCH_LIBRARY(fisheradaptune, m) {
  // fisher[i] = decay * fisher[i] + scale * grads[i]**2, fused over the whole list.
  // Writes per-group sums of the updated Fisher into group_sums (float32 [num_groups]) and the
  // number of skipped non-finite elements into nonfinite (int64, 0-d). See Note [Skipping].
  m.def(
      "fisher_accumulate_(Tensor(a!)[] fisher, Tensor?[] grads, float decay, float scale, "
      "Tensor? segments, Tensor(b!) group_sums, Tensor(c!) nonfinite) -> ()");
  // Jensen-Shannon distance per group between current and reference Fisher snapshots
  // (docs/methods.md section 3). drift_mode: "mass" | "histogram". (Not "mode":
  // functionalization passes a keyword of that name to its own helpers.) If update_reference is
  // given, also does reference = rho * reference + (1 - rho) * current after scoring.
  m.def(
      "js_drift(Tensor[] current, Tensor(a!)[] reference, Tensor segments, int num_groups, "
      "str drift_mode, int bins, float lower_q, float upper_q, float min_log_range, bool base2, "
      "float? update_reference) -> Tensor");
  // Sharded mass drift (Note [Sharded drift], csrc/drift/drift_math.h): js_drift's "mass" mode in
  // two halves whose results add over shards. js_mass_totals gives float64 [2, num_groups]: per
  // group, sum |current| and sum |reference| over the elements given. js_mass_partial gives float64
  // [num_groups]: per group, the sum of JS^2 terms (nats) of the elements given, with p = |current|
  // / totals[0], q = |reference| / totals[1] (0 where a total is 0), and applies the reference
  // update as js_drift does.
  m.def(
      "js_mass_totals(Tensor[] current, Tensor[] reference, Tensor segments, int num_groups) "
      "-> Tensor");
  m.def(
      "js_mass_partial(Tensor[] current, Tensor(a!)[] reference, Tensor segments, "
      "int num_groups, Tensor totals, float? update_reference) -> Tensor");
  // fisher[out, in] += scale * sum_n (grad_out[n]^T x[n])**2 for a Linear layer with
  // x [N, T, in] and grad_out [N, T, out]; per-sample gradients exist one tile at a time.
  // Elements whose update would not be finite are skipped, and their number written into
  // nonfinite (int64, 0-d), as fisher_accumulate_ does. See Note [Skipping in
  // per_sample_grad_sq_] (csrc/fisher/per_sample_grad_sq.cpp). The GEMMs follow the caller's
  // float32 matmul precision; the typed wrapper fisheradaptune.ops.per_sample_grad_sq_ runs them
  // in full fp32 (Note [Full fp32 per-sample GEMM], same file).
  m.def(
      "per_sample_grad_sq_(Tensor(a!) fisher, Tensor x, Tensor grad_out, float scale, "
      "Tensor(b!) nonfinite) -> ()");
  // Token prune-merge (docs/methods.md section 6): of the tokens after the first num_protected,
  // keep the `keep` with the highest score (ties: lower index) in their original order and fuse
  // the rest into one token sum_i w_i x_i [/ sum_i w_i], w_i = scores_i * sizes_i. Returns
  // (out [B, P + keep (+1), C], kept_index int64 [B, keep], out_sizes float32 [B, P + keep (+1)]).
  // See Note [Token prune-merge] (csrc/tokens/token_prune_merge.h).
  m.def(
      "token_prune_merge(Tensor x, Tensor scores, Tensor? sizes, int num_protected, int keep, "
      "bool normalize) -> (Tensor, Tensor, Tensor)");
  // Gradients of token_prune_merge's `out` with respect to x and scores.
  m.def(
      "token_prune_merge_backward(Tensor grad_out, Tensor x, Tensor scores, Tensor? sizes, "
      "Tensor kept_index, int num_protected, bool normalize) -> (Tensor, Tensor)");
  // ToMe bipartite merging (docs/methods.md section 7): of the tokens after the first
  // num_protected, alternate ones form sets A and B; the r A tokens most similar (cosine on
  // metric) to their best B token merge into it by size-weighted mean. Returns (out [B, N - r, C]:
  // protected, unmerged A, B tokens; out_sizes float32 [B, N - r]; dest_index int64 [B, N], the
  // out row of every token). See Note [Bipartite merge] (csrc/tokens/bipartite_merge.h).
  m.def(
      "bipartite_merge(Tensor x, Tensor metric, Tensor? sizes, int num_protected, int r) "
      "-> (Tensor, Tensor, Tensor)");
  // Gradient of bipartite_merge's `out` with respect to x (the matching gets none).
  m.def("bipartite_merge_backward(Tensor grad_out, Tensor? sizes, Tensor dest_index) -> Tensor");
  // TR-PTS sampled weight gradient (SDDMM): out[i, c] = sum_t grad_out[t, i] * x[t, index[i, c]]
  // with grad_out [T, out], x [T, in], index int64 [out, C]; float32 out (float64 for float64
  // inputs). index_checked = true skips the check of index's values (a CUDA synchronisation):
  // the caller has checked this index already; a stale flag gives NaN, never an out-of-bounds
  // read. See Note [Sampled gradient] (csrc/sparse/sampled_grad.h) and Note [Checked indices]
  // (csrc/sparse/sampled_grad_args.cpp).
  m.def(
      "sampled_grad(Tensor grad_out, Tensor x, Tensor index, bool index_checked=False) "
      "-> Tensor");
}

// The extension is loaded as a Python module so that `import fisheradaptune._C` runs the
// static registrations above; it has no Python bindings of its own, only two integer constants:
// CHUNK and BLOCK, the kernels' chunk and block sizes (Note [Chunk and block sizes], plan.h),
// so that Python code sizes its edge cases from the values the kernels use.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "CHUNK", static_cast<long>(fisheradaptune::kChunk)) < 0 ||
      PyModule_AddIntConstant(m, "BLOCK", static_cast<long>(fisheradaptune::kBlock)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
