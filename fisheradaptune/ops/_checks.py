"""The argument checks of the ``torch.ops.fisheradaptune`` operators in Python: one
``validate_<op>`` per op, the twin of the C++ validation, shared by every Python kernel that
must refuse what the compiled op refuses (the fake kernels of each family module).

A fake kernel runs instead of the C++ one whenever the op sees a FakeTensor (``torch.compile``,
FakeTensor tracing) or a meta tensor (the Meta dispatch key wins over CPU and CUDA, so one meta
tensor among CPU ones is enough). Returning output shapes alone would let tracing accept input
that the eager op rejects, and turn a stray meta tensor into a call that silently writes nothing.
So every fake kernel first calls its op's ``validate_<op>``, which makes the checks of its C++
twin (csrc/common/validate.h, csrc/<family>/<op>_args.cpp, csrc/common/validate.cpp, csrc/tokens/token_prune_merge_args.cpp, csrc/tokens/bipartite_merge_args.cpp,
csrc/sparse/sampled_grad_args.cpp and the CUDA kernels' own limits), in the same order, raising the same exception
types with the same messages (``fisheradaptune.<op>: argument '<name>': expected ...``;
ValueError for every argument error: shapes, lengths, devices, values and dtypes alike, since a
kernel on the stable ABI cannot raise TypeError, Note [Stable ABI] in csrc/common/stable.h).

Aliasing (Note [Aliasing] in csrc/common/validate.h): the fakes refuse the same overlaps as the C++,
compared within each storage (a fake tensor has no address), so that torch.compile does not run
what eager refuses.

What a fake kernel cannot check is what needs data: it never reads a tensor's values, so the
rows of ``segments`` (indices in range, no overlap), the range of ``sampled_grad``'s ``index``,
the order of ``token_prune_merge_backward``'s ``kept_index`` and the range of
``bipartite_merge_backward``'s ``dest_index`` stay unchecked while tracing;
the real kernel checks them when it runs. (A kernel that runs on data must add those checks.)

Devices. Every tensor must be on the op's device, which is chosen as in the C++ (the first
tensor in each op's order), except that a meta tensor decides it only when no tensor of the call
is on a real device: among CPU tensors a meta tensor is then refused by name, while a call whose
tensors are all meta (meta tracing) passes and returns meta outputs of the right shapes. There
``segments`` may stay on the CPU (``GroupLayout.segments``) or be meta as well, and float64
state counts as CPU state, the meta device standing for any real one. Under FakeTensorMode a
tensor reports its fake device (cpu, cuda), so the checks are exactly those of real validation.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["validate_fisher_accumulate", "validate_js_drift", "validate_js_mass_totals",
           "validate_js_mass_partial", "validate_per_sample_grad_sq", "validate_token_prune_merge",
           "validate_token_prune_merge_backward", "validate_bipartite_merge",
           "validate_bipartite_merge_backward", "validate_sampled_grad"]

_INT32_MAX = 2 ** 31 - 1
_FLOAT32_MAX = torch.finfo(torch.float32).max
_MAX_BINS = 2 ** 30  # js_drift's bins, every backend (kMaxBins, csrc/drift/drift.h)

# c10::ScalarType's names, which the C++ messages print (``Float``, not ``torch.float32``).
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble", torch.complex32: "ComplexHalf",
}


# ---------------------------------------------------------------------------------------------
# The shared checks, one per helper of csrc/common/validate.h


def _fmt(part: object) -> str:
    """One piece of a message, printed as the C++ prints it (shapes ``[4, 8]``, doubles ``%g``)."""
    if isinstance(part, torch.dtype):
        return _SCALAR_TYPE_NAMES.get(part, str(part))
    if isinstance(part, torch.Size):
        return "[" + ", ".join(str(s) for s in part) + "]"
    if isinstance(part, float):
        return format(part, "g")
    return str(part)


def _check(error: type, cond, op: str, arg: str, *parts: object) -> None:
    """FAT_CHECK_VALUE: raise ``error`` naming the op and the argument unless
    ``cond``. ``torch._check_with`` accepts a SymBool, so a check on a symbolic size becomes a
    guard (or a deferred runtime assert) rather than an error while tracing dynamic shapes."""
    torch._check_with(error, cond, lambda: f"fisheradaptune.{op}: argument '{arg}': "
                      + "".join(_fmt(p) for p in parts))


def _check_value(cond, op: str, arg: str, *parts: object) -> None:
    _check(ValueError, cond, op, arg, *parts)


def _item(arg: str, i: int) -> str:
    return f"{arg}[{i}]"


def _is_host(device: torch.device) -> bool:
    """Where float64 state is admitted: the CPU, and meta standing for it."""
    return device.type in ("cpu", "meta")


def _op_device(candidates: Sequence[Optional[Tensor]], default: torch.device) -> torch.device:
    """The device every tensor of the call must be on: that of the first candidate (the C++'s
    order) not on meta, meta when all are, ``default`` when there is none. Skipping meta lets
    the checks below name the meta tensor in a call that mixes it with real ones."""
    tensors = [t for t in candidates if t is not None]
    for t in tensors:
        if t.device.type != "meta":
            return t.device
    return tensors[0].device if tensors else default


def _check_device(op: str, arg: str, t: Tensor, device: torch.device) -> None:
    _check_value(t.device == device, op, arg, "expected a tensor on ", device, ", got ", t.device)


def _check_same_length(op: str, a: str, na: int, b: str, nb: int) -> None:
    _check_value(na == nb, op, b, "expected a list of the same length as '", a, "' (", na,
                 "), got ", nb)


def _check_same_shape(op: str, arg: str, t: Tensor, like: Tensor) -> None:
    _check_value(t.shape == like.shape, op, arg, "expected shape ", like.shape, ", got ", t.shape)


def _check_state(op: str, arg: str, t: Tensor) -> None:
    """Fisher-like state: float32, or float64 on the CPU; contiguous (kernels write it)."""
    ok = t.dtype == torch.float32 or (t.dtype == torch.float64 and _is_host(t.device))
    _check_value(ok, op, arg, "expected float32 (or float64 on CPU), got ", t.dtype, " on ",
                t.device)
    _check_value(t.is_contiguous(), op, arg, "expected a contiguous tensor")


def _check_fisher_state(op: str, arg: str, t: Tensor) -> None:
    """check_fisher_state (csrc/common/state.h): Fisher state as fisher_accumulate_ and
    the drift ops write it: float32 or bfloat16 (Note [bfloat16 state]), or float64 on the CPU;
    contiguous."""
    ok = t.dtype in (torch.float32, torch.bfloat16) or (
        t.dtype == torch.float64 and _is_host(t.device))
    _check_value(ok, op, arg, "expected float32 or bfloat16 (or float64 on CPU), got ", t.dtype,
                 " on ", t.device)
    _check_value(t.is_contiguous(), op, arg, "expected a contiguous tensor")


def _check_grad_dtype(op: str, arg: str, g: Tensor, state: Tensor) -> None:
    ok = g.dtype in (torch.float32, torch.bfloat16, torch.float16) or (
        g.dtype == torch.float64 and state.dtype == torch.float64)
    _check_value(ok, op, arg, "expected float32, bfloat16 or float16 (float64 with float64 "
                "state), got ", g.dtype)


def _check_coefficient(op: str, arg: str, v: float, what: str = "a finite number",
                       hi: float = _FLOAT32_MAX) -> None:
    """check_coefficient (csrc/common/validate.h, Note [Coefficients]): ``0 <= v <= hi``; NaN fails."""
    suffix = " (float32's range: the kernels multiply in float32)" if hi == _FLOAT32_MAX else ""
    _check_value(0.0 <= v <= hi, op, arg, "expected ", what, " in [0, ", float(hi), "]", suffix,
                 ", got ", float(v))


def _check_count(op: str, nonfinite: Tensor, device: torch.device) -> None:
    """The ``nonfinite`` count output: one int64 element on the op's device."""
    _check_device(op, "nonfinite", nonfinite, device)
    _check_value(nonfinite.dtype == torch.int64, op, "nonfinite", "expected int64, got ",
                nonfinite.dtype)
    _check_value(nonfinite.numel() == 1, op, "nonfinite", "expected one element, got ",
                 nonfinite.numel())


def _check_segments(op: str, arg: str, segments: Tensor, device: torch.device) -> None:
    """read_segments (csrc/common/validate.cpp) without the data: int64 ``[S, 4]`` on the CPU (or CUDA,
    copied to the host), or meta in an all-meta call. The rows are values, unchecked here."""
    _check_value(segments.dtype == torch.int64, op, arg, "expected int64, got ", segments.dtype)
    _check_value(segments.dim() == 2 and segments.shape[1] == 4, op, arg,
                 "expected shape [S, 4] (tensor_index, begin, end, group_id), got ",
                 segments.shape)
    on = segments.device
    ok = on.type in ("cpu", "cuda") or (on.type == "meta" and device.type == "meta")
    _check_value(ok, op, arg, "expected a CPU tensor (kernels plan on the host; "
                 "GroupLayout.segments is the CPU copy), got one on ", on)


def _byte_span(t: Optional[Tensor]) -> Optional[Tuple[int, int, int]]:
    """``(storage, begin, end)``: the bytes ``t`` spans in its storage, or None when it owns no
    memory (absent, empty). As check_no_aliasing: a tensor with gaps counts by its whole span."""
    if t is None or t.numel() == 0:
        return None
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    begin = t.storage_offset() * t.element_size()
    return t.untyped_storage()._cdata, begin, begin + (last + 1) * t.element_size()


def _check_no_aliasing(op: str, args: Sequence[Tuple[Optional[Tensor], str, bool]]) -> None:
    """check_no_aliasing (csrc/common/validate.h, Note [Aliasing]): ``args`` are ``(tensor, name,
    written)`` in the schema's order; refuse any overlap that involves a written tensor, naming
    the later argument and the earlier one, as the C++ does.

    The C++ compares addresses; a fake or meta tensor has none, so ranges are compared within
    each storage (FakeTensorMode and torch.compile keep the inputs' storage sharing and
    offsets). The same address sweep runs per storage: the same pair is named whenever the
    overlaps are within one storage (with overlaps in several, eager names the one at the
    lowest address, which a fake tensor cannot know)."""
    by_storage: dict = {}
    for k, (t, _, _) in enumerate(args):
        span = _byte_span(t)
        if span is not None:
            by_storage.setdefault(span[0], []).append((span[1], span[2], k))
    if not any(args[k][2] for spans in by_storage.values() for _, _, k in spans):
        return
    for spans in by_storage.values():
        spans.sort(key=lambda s: (s[0], s[2]))
        far_any = far_written = None
        for begin, end, k in spans:
            hit = far_any if args[k][2] else far_written
            if hit is not None and hit[1] > begin:
                first, second = min(hit[2], k), max(hit[2], k)
                both = args[first][2] and args[second][2]
                _check_value(False, op, args[second][1], "shares memory with '", args[first][1],
                             "', and ", "both are" if both else "one is", " written in place: "
                             "the kernels' parallel chunks would race. Pass tensors that do not "
                             "overlap (e.g. clone one of them)")
            if far_any is None or end > far_any[1]:
                far_any = (begin, end, k)
            if args[k][2] and (far_written is None or end > far_written[1]):
                far_written = (begin, end, k)


def _as_read(t: Optional[Tensor]) -> Optional[Tensor]:
    """An input as the kernel reads it: a non-contiguous one is copied first, and the copy
    aliases nothing (Note [Aliasing])."""
    return t if t is not None and t.is_contiguous() else None


# ---------------------------------------------------------------------------------------------
# fisher_accumulate_ (validate_fisher_accumulate)


def validate_fisher_accumulate(fisher: List[Tensor], grads: List[Optional[Tensor]], decay: float,
                               scale: float, segments: Optional[Tensor], group_sums: Tensor,
                               nonfinite: Tensor) -> torch.device:
    """validate_fisher_accumulate. Returns the op's device."""
    op = "fisher_accumulate_"
    _check_same_length(op, "fisher", len(fisher), "grads", len(grads))
    _check_coefficient(op, "decay", decay)
    _check_coefficient(op, "scale", scale)
    # The outputs decide the device, so that empty lists still have one.
    device = _op_device([nonfinite, group_sums, *fisher, *grads], nonfinite.device)
    _check_count(op, nonfinite, device)
    _check_device(op, "group_sums", group_sums, device)
    _check_value(group_sums.dtype == torch.float32, op, "group_sums", "expected float32, got ",
                group_sums.dtype)
    _check_value(group_sums.dim() == 1 and group_sums.is_contiguous(), op, "group_sums",
                 "expected a contiguous 1-D tensor, got shape ", group_sums.shape)
    for i, f in enumerate(fisher):
        _check_device(op, _item("fisher", i), f, device)
        _check_fisher_state(op, _item("fisher", i), f)
    for i, g in enumerate(grads):
        if g is None:
            continue
        where = _item("grads", i)
        _check_device(op, where, g, device)
        _check_same_shape(op, where, g, fisher[i])
        _check_grad_dtype(op, where, g, fisher[i])
    if segments is not None:
        _check_segments(op, "segments", segments, device)
        # A CUDA `segments` routes the call to the CUDA kernel, which wants CUDA outputs.
        _check_value(segments.device.type != "cuda" or device.type == "cuda", op, "nonfinite",
                     "expected a CUDA tensor for CUDA inputs, got ", device)
    else:
        _check_value(group_sums.numel() == 0, op, "group_sums",
                     "expected an empty tensor when no segments are given, got ",
                     group_sums.numel(), " elements")
    _check_no_aliasing(op, [*[(f, _item("fisher", i), True) for i, f in enumerate(fisher)],
                            *[(_as_read(g), _item("grads", i), False) for i, g in enumerate(grads)],
                            (group_sums, "group_sums", True), (nonfinite, "nonfinite", True)])
    return device


# ---------------------------------------------------------------------------------------------
# js_drift, js_mass_totals, js_mass_partial (validate_js_drift, validate_js_mass)


def _check_drift_lists(op: str, current: List[Tensor], reference: List[Tensor], segments: Tensor,
                       num_groups: int, update_reference: Optional[float],
                       totals: Optional[Tensor] = None) -> torch.device:
    """check_drift_lists: two lists of like state tensors and a layout. Returns the device.

    The C++ takes ``segments``' device when they are not on the CPU, else ``current[0]``'s;
    ``totals`` comes last, deciding only in an otherwise meta call."""
    _check_same_length(op, "current", len(current), "reference", len(reference))
    _check_value(num_groups >= 0, op, "num_groups", "expected >= 0, got ", num_groups)
    if update_reference is not None:
        rho = update_reference
        _check_coefficient(op, "update_reference", rho, "a decay", 1.0)
    lead = [segments] if segments.device.type != "cpu" else []
    device = _op_device([*lead, *current, *reference, totals], segments.device)
    for i, r in enumerate(reference):
        _check_device(op, _item("reference", i), r, device)
        _check_fisher_state(op, _item("reference", i), r)
    for i, c in enumerate(current):
        where = _item("current", i)
        _check_device(op, where, c, device)
        _check_same_shape(op, where, c, reference[i])
        _check_value(c.dtype == reference[i].dtype, op, where, "expected the dtype of reference[",
                    i, "] (", reference[i].dtype, "), got ", c.dtype)
    for i in range(1, len(reference)):
        _check_value(reference[i].dtype == reference[0].dtype, op, _item("reference", i),
                    "expected every tensor to share the dtype of reference[0] (",
                    reference[0].dtype, "), got ", reference[i].dtype)
    _check_segments(op, "segments", segments, device)
    return device


def _check_drift_aliasing(op: str, current: List[Tensor], reference: List[Tensor],
                          update_reference: Optional[float],
                          totals: Optional[Tensor] = None) -> None:
    """check_drift_aliasing: only an update writes (the reference list)."""
    if update_reference is None:
        return
    _check_no_aliasing(op, [*[(_as_read(c), _item("current", i), False)
                              for i, c in enumerate(current)],
                            *[(r, _item("reference", i), True) for i, r in enumerate(reference)],
                            (totals, "totals", False)])


def validate_js_drift(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                      num_groups: int, drift_mode: str, bins: int, lower_q: float, upper_q: float,
                      min_log_range: float, base2: bool,
                      update_reference: Optional[float]) -> torch.device:
    """validate_js_drift. Returns the op's device."""
    op = "js_drift"
    _check_value(drift_mode in ("mass", "histogram"), op, "drift_mode",
                 "expected \"mass\" or \"histogram\", got \"", drift_mode, "\"")
    _check_value(2 <= bins <= _MAX_BINS, op, "bins", "expected 2 <= bins <= 2^30, got ", bins)
    _check_value(0.0 <= lower_q < upper_q <= 1.0, op, "lower_q/upper_q",
                 "expected 0 <= lower_q < upper_q <= 1, got ", lower_q, " and ", upper_q)
    _check_value(math.isfinite(min_log_range) and min_log_range > 0, op, "min_log_range",
                 "expected a finite number > 0, got ", min_log_range)
    device = _check_drift_lists(op, current, reference, segments, num_groups, update_reference)
    _check_drift_aliasing(op, current, reference, update_reference)
    return device


def _check_totals(op: str, totals: Tensor, num_groups: int, device: torch.device) -> None:
    _check_value(totals.dtype == torch.float64, op, "totals", "expected float64, got ",
                totals.dtype)
    _check_value(totals.dim() == 2 and totals.shape[0] == 2 and totals.shape[1] == num_groups,
                 op, "totals", "expected shape [2, ", num_groups, "], got ", totals.shape)
    _check_device(op, "totals", totals, device)


def validate_js_mass_totals(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                            num_groups: int) -> torch.device:
    """validate_js_mass (totals). Returns the op's device."""
    return _check_drift_lists("js_mass_totals", current, reference, segments, num_groups, None)


def validate_js_mass_partial(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                             num_groups: int, totals: Tensor,
                             update_reference: Optional[float]) -> torch.device:
    """validate_js_mass (partial). Returns the op's device."""
    op = "js_mass_partial"
    device = _check_drift_lists(op, current, reference, segments, num_groups, update_reference,
                                totals)
    _check_totals(op, totals, num_groups, device)
    _check_drift_aliasing(op, current, reference, update_reference, totals)
    return device


# ---------------------------------------------------------------------------------------------
# per_sample_grad_sq_ (validate_per_sample_grad_sq)


def validate_per_sample_grad_sq(fisher: Tensor, x: Tensor, grad_out: Tensor, scale: float,
                                nonfinite: Tensor) -> torch.device:
    """validate_per_sample_grad_sq. Returns the op's device."""
    op = "per_sample_grad_sq_"
    _check_coefficient(op, "scale", scale)
    device = _op_device([fisher, nonfinite, x, grad_out], fisher.device)
    _check_device(op, "fisher", fisher, device)
    _check_state(op, "fisher", fisher)
    _check_count(op, nonfinite, device)
    _check_device(op, "x", x, device)
    _check_device(op, "grad_out", grad_out, device)
    _check_value(x.dim() == 3, op, "x", "expected [N, T, in_features], got shape ", x.shape)
    _check_value(grad_out.dim() == 3, op, "grad_out", "expected [N, T, out_features], got shape ",
                 grad_out.shape)
    _check_value(grad_out.shape[0] == x.shape[0] and grad_out.shape[1] == x.shape[1], op,
                 "grad_out", "expected the same N and T as x ", x.shape, ", got ", grad_out.shape)
    _check_value(fisher.dim() == 2 and fisher.shape[0] == grad_out.shape[2]
                 and fisher.shape[1] == x.shape[2], op, "fisher", "expected shape [",
                 grad_out.shape[2], ", ", x.shape[2], "] (out_features, in_features), got ",
                 fisher.shape)
    _check_grad_dtype(op, "x", x, fisher)
    _check_value(grad_out.dtype == x.dtype, op, "grad_out", "expected the dtype of x (", x.dtype,
                "), got ", grad_out.dtype)
    _check_no_aliasing(op, [(fisher, "fisher", True), (x, "x", False),
                            (grad_out, "grad_out", False), (nonfinite, "nonfinite", True)])
    return device


# ---------------------------------------------------------------------------------------------
# token_prune_merge and its backward (csrc/tokens/token_prune_merge_args.cpp)

_TOKEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_tokens(op: str, x: Tensor, scores: Tensor, sizes: Optional[Tensor],
                  num_protected: int, device: torch.device) -> Tuple[int, int, int, int]:
    """check_common: x ``[B, N, C]``, scores ``[B, M]``, sizes ``[B, N]``. Returns
    ``(B, N, C, M)`` with ``M = N - num_protected``."""
    _check_device(op, "x", x, device)
    _check_value(x.dim() == 3, op, "x", "expected [B, N, C], got shape ", x.shape)
    _check_token_dtype(op, "x", x)
    b, n, c = x.shape
    _check_token_count(op, "x", n)
    _check_value(0 <= num_protected < n, op, "num_protected", "expected 0 <= num_protected < N = ",
                 n, " (at least one token that can be pruned), got ", num_protected)
    m = n - num_protected
    _check_device(op, "scores", scores, device)
    _check_value(scores.dim() == 2 and scores.shape[0] == b and scores.shape[1] == m, op, "scores",
                 "expected shape [B, N - num_protected] = [", b, ", ", m, "], got ", scores.shape)
    _check_value(scores.dtype == x.dtype or scores.dtype == torch.float32, op, "scores",
                "expected x's dtype (", x.dtype, ") or float32, got ", scores.dtype)
    _check_sizes(op, sizes, b, n, device)
    return b, n, c, m


def _check_token_dtype(op: str, arg: str, t: Tensor) -> None:
    _check_value(t.dtype in _TOKEN_DTYPES, op, arg,
                "expected float32, bfloat16, float16 or float64, got ", t.dtype)


def _check_token_count(op: str, arg: str, n: int) -> None:
    _check_value(n <= _INT32_MAX, op, arg, "expected at most 2^31 - 1 tokens (N; the kernels "
                 "index tokens in int32), got N = ", n)


def _check_sizes(op: str, sizes: Optional[Tensor], b: int, n: int, device: torch.device) -> None:
    """check_token_sizes: float32 ``[B, N]`` on the op's device, or None."""
    if sizes is not None:
        _check_device(op, "sizes", sizes, device)
        _check_value(sizes.dim() == 2 and sizes.shape[0] == b and sizes.shape[1] == n, op, "sizes",
                     "expected shape [B, N] = [", b, ", ", n, "], got ", sizes.shape)
        _check_value(sizes.dtype == torch.float32, op, "sizes", "expected float32, got ",
                    sizes.dtype)


def _check_launch_shape(op: str, device: torch.device, b: int, n: int) -> None:
    """The CUDA kernels' grid limits (checked there only for a non-empty batch)."""
    if device.type == "cuda" and b > 0:
        _check_value(b <= _INT32_MAX, op, "x", "at most 2^31 - 1 batch rows on CUDA, got ", b)
        _check_value(n <= _INT32_MAX, op, "x", "at most 2^31 - 1 tokens on CUDA, got ", n)


def validate_token_prune_merge(x: Tensor, scores: Tensor, sizes: Optional[Tensor],
                               num_protected: int, keep: int, normalize: bool) -> int:
    """token_prune_merge's checks (csrc/tokens/token_prune_merge_args.cpp). Returns the number of out rows,
    ``num_protected + keep`` plus the fused token when there is one."""
    op = "token_prune_merge"
    device = _op_device([x, scores, sizes], x.device)
    b, n, c, m = _check_tokens(op, x, scores, sizes, num_protected, device)
    _check_value(0 <= keep <= m, op, "keep", "expected 0 <= keep <= N - num_protected = ", m,
                 ", got ", keep)
    _check_launch_shape(op, device, b, n)
    return num_protected + keep + (1 if keep < m else 0)


def validate_token_prune_merge_backward(grad_out: Tensor, x: Tensor, scores: Tensor,
                                        sizes: Optional[Tensor], kept_index: Tensor,
                                        num_protected: int, normalize: bool) -> None:
    """token_prune_merge_backward's checks (csrc/tokens/token_prune_merge_args.cpp)."""
    op = "token_prune_merge_backward"
    device = _op_device([x, scores, sizes, kept_index, grad_out], x.device)
    b, n, c, m = _check_tokens(op, x, scores, sizes, num_protected, device)
    _check_device(op, "kept_index", kept_index, device)
    _check_value(kept_index.dtype == torch.int64, op, "kept_index", "expected int64, got ",
                kept_index.dtype)
    _check_value(kept_index.dim() == 2 and kept_index.shape[0] == b and kept_index.shape[1] <= m,
                 op, "kept_index", "expected shape [B, keep] = [", b, ", keep <= ", m, "], got ",
                 kept_index.shape)
    rows = num_protected + kept_index.shape[1] + (1 if kept_index.shape[1] < m else 0)
    _check_device(op, "grad_out", grad_out, device)
    _check_value(grad_out.dtype == x.dtype, op, "grad_out", "expected x's dtype (", x.dtype,
                "), got ", grad_out.dtype)
    _check_value(grad_out.dim() == 3 and grad_out.shape[0] == b and grad_out.shape[1] == rows
                 and grad_out.shape[2] == c, op, "grad_out", "expected shape [", b, ", ", rows,
                 ", ", c, "], got ", grad_out.shape)
    # kept_index's values (strictly increasing, in [0, M)) are data: checked by the CPU kernel.
    _check_launch_shape(op, device, b, n)


# ---------------------------------------------------------------------------------------------
# bipartite_merge and its backward (csrc/tokens/bipartite_merge_args.cpp)


def validate_bipartite_merge(x: Tensor, metric: Tensor, sizes: Optional[Tensor],
                             num_protected: int, r: int) -> None:
    """bipartite_merge's checks (csrc/tokens/bipartite_merge_args.cpp)."""
    op = "bipartite_merge"
    device = _op_device([x, metric, sizes], x.device)
    _check_device(op, "x", x, device)
    _check_value(x.dim() == 3, op, "x", "expected [B, N, C], got shape ", x.shape)
    _check_token_dtype(op, "x", x)
    b, n, c = x.shape
    _check_token_count(op, "x", n)
    _check_device(op, "metric", metric, device)
    _check_value(metric.dim() == 3 and metric.shape[0] == b and metric.shape[1] == n, op,
                 "metric", "expected shape [B, N, D] with [B, N] = [", b, ", ", n, "], got ",
                 metric.shape)
    _check_token_dtype(op, "metric", metric)
    _check_sizes(op, sizes, b, n, device)
    _check_value(0 <= num_protected <= n, op, "num_protected", "expected 0 <= num_protected <= N = ",
                 n, ", got ", num_protected)
    bound = (n - num_protected) // 2  # min(|A'|, |B'|), Note [Bipartite merge]
    _check_value(0 <= r <= bound, op, "r", "expected 0 <= r <= (N - num_protected) // 2 = ", bound,
                 " (ToMe's bound: each merge needs its own source and destination), got ", r)
    _check_launch_shape(op, device, b, n)


def validate_bipartite_merge_backward(grad_out: Tensor, sizes: Optional[Tensor],
                                      dest_index: Tensor) -> None:
    """bipartite_merge_backward's checks (csrc/tokens/bipartite_merge_args.cpp)."""
    op = "bipartite_merge_backward"
    device = _op_device([grad_out, sizes, dest_index], grad_out.device)
    _check_device(op, "grad_out", grad_out, device)
    _check_value(grad_out.dim() == 3, op, "grad_out", "expected [B, N - r, C], got shape ",
                 grad_out.shape)
    _check_token_dtype(op, "grad_out", grad_out)
    _check_device(op, "dest_index", dest_index, device)
    _check_value(dest_index.dtype == torch.int64, op, "dest_index", "expected int64, got ",
                dest_index.dtype)
    b, rows, c = grad_out.shape
    _check_value(dest_index.dim() == 2 and dest_index.shape[0] == b
                 and dest_index.shape[1] >= rows, op, "dest_index", "expected shape [B, N] = [",
                 b, ", N >= ", rows, "] (N - r out rows), got ", dest_index.shape)
    n = dest_index.shape[1]
    _check_token_count(op, "dest_index", n)
    _check_sizes(op, sizes, b, n, device)
    # dest_index's values (in [0, N - r)) are data: checked by the CPU kernel.
    _check_launch_shape(op, device, b, n)


# ---------------------------------------------------------------------------------------------
# sampled_grad (validate_sampled_grad)

_SPARSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def validate_sampled_grad(grad_out: Tensor, x: Tensor, index: Tensor) -> None:
    """validate_sampled_grad (csrc/sparse/sampled_grad_args.cpp)."""
    op = "sampled_grad"
    device = _op_device([grad_out, x, index], grad_out.device)
    _check_device(op, "grad_out", grad_out, device)
    _check_value(grad_out.dim() == 2, op, "grad_out", "expected [T, out], got shape ",
                 grad_out.shape)
    _check_value(grad_out.dtype in _SPARSE_DTYPES, op, "grad_out",
                "expected float32, bfloat16, float16 or float64, got ", grad_out.dtype)
    _check_device(op, "x", x, device)
    _check_value(x.dim() == 2 and x.shape[0] == grad_out.shape[0], op, "x",
                 "expected [T, in] with T = ", grad_out.shape[0], " (grad_out's rows), got shape ",
                 x.shape)
    _check_value(x.dtype == grad_out.dtype, op, "x", "expected grad_out's dtype (",
                grad_out.dtype, "), got ", x.dtype)
    _check_device(op, "index", index, device)
    _check_value(index.dtype == torch.int64, op, "index", "expected int64, got ", index.dtype)
    _check_value(index.dim() == 2 and index.shape[0] == grad_out.shape[1], op, "index",
                 "expected [out, C] with out = ", grad_out.shape[1],
                 " (grad_out's columns), got shape ", index.shape)
    rows, picks, cols = index.shape[0], index.shape[1], x.shape[1]
    # Index values in [0, in) are data (checked by the kernels); in == 0 is a shape.
    _check_value(rows * picks == 0 or cols > 0, op, "index",
                 "expected no columns (C = 0) when x has no features (in = 0), got shape ",
                 index.shape)
