"""Every ``torch.ops.fisheradaptune`` operator's schema, as Python strings.

The compiled library defines the same schemas in C++; when it cannot be used (the pure-PyTorch
fallback, :mod:`fisheradaptune._loader`) these strings define the operators instead, so that
the ops exist under the same names with the same signatures either way. A test compares them
with the compiled library's schemas whenever that library is loaded, so they cannot drift.
What each op computes is said at its typed wrapper (:mod:`fisheradaptune.ops`).
"""
from __future__ import annotations

from typing import Dict

__all__ = ["NAMESPACE", "SCHEMAS"]

#: The operator namespace.
NAMESPACE = "fisheradaptune"

#: Op name -> schema (without the namespace), in the compiled library's order.
SCHEMAS: Dict[str, str] = {
    "fisher_accumulate_": (
        "fisher_accumulate_(Tensor(a!)[] fisher, Tensor?[] grads, float decay, float scale, "
        "Tensor? segments, Tensor(b!) group_sums, Tensor(c!) nonfinite) -> ()"),
    "js_drift": (
        "js_drift(Tensor[] current, Tensor(a!)[] reference, Tensor segments, int num_groups, "
        "str drift_mode, int bins, float lower_q, float upper_q, float min_log_range, bool base2, "
        "float? update_reference) -> Tensor"),
    "js_mass_totals": (
        "js_mass_totals(Tensor[] current, Tensor[] reference, Tensor segments, int num_groups) "
        "-> Tensor"),
    "js_mass_partial": (
        "js_mass_partial(Tensor[] current, Tensor(a!)[] reference, Tensor segments, "
        "int num_groups, Tensor totals, float? update_reference) -> Tensor"),
    "per_sample_grad_sq_": (
        "per_sample_grad_sq_(Tensor(a!) fisher, Tensor x, Tensor grad_out, float scale, "
        "Tensor(b!) nonfinite) -> ()"),
    "token_prune_merge": (
        "token_prune_merge(Tensor x, Tensor scores, Tensor? sizes, int num_protected, int keep, "
        "bool normalize) -> (Tensor, Tensor, Tensor)"),
    "token_prune_merge_backward": (
        "token_prune_merge_backward(Tensor grad_out, Tensor x, Tensor scores, Tensor? sizes, "
        "Tensor kept_index, int num_protected, bool normalize) -> (Tensor, Tensor)"),
    "bipartite_merge": (
        "bipartite_merge(Tensor x, Tensor metric, Tensor? sizes, int num_protected, int r) "
        "-> (Tensor, Tensor, Tensor)"),
    "bipartite_merge_backward": (
        "bipartite_merge_backward(Tensor grad_out, Tensor? sizes, Tensor dest_index) -> Tensor"),
    "sampled_grad": (
        "sampled_grad(Tensor grad_out, Tensor x, Tensor index, bool index_checked=False) "
        "-> Tensor"),
}
