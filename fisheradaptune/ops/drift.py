"""The drift family: ``js_drift`` (Jensen-Shannon distance between two Fisher snapshots per
group, docs/methods.md section 3) and its two sharded halves ``js_mass_totals`` and
``js_mass_partial``.

Each op's Python story in one place: the typed wrapper, the fake kernel (the C++ checks, from
:mod:`._checks`), the ``ADInplaceOrView`` kernel of the ops that write ``reference`` on request
(Note [In-place writes] in :mod:`._library`) and the ``Autograd`` kernel refusing inputs that
require grad (the distances have no derivative: Note [No derivative] there).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import _checks, _library
from ._library import OPS as _ops, segments as _segments
from ..groups import GroupLayout

__all__ = ["js_drift", "js_mass_totals", "js_mass_partial"]


# ---------------------------------------------------------------------------------------------
# js_drift


def js_drift(
    current: Sequence[Tensor],
    reference: Sequence[Tensor],
    layout: GroupLayout,
    *,
    drift_mode: str = "mass",
    bins: int = 64,
    lower_q: float = 0.01,
    upper_q: float = 0.99,
    min_log_range: float = 1e-3,
    base: str = "e",
    update_reference: Optional[float] = None,
) -> Tensor:
    """Jensen-Shannon distance between two Fisher snapshots, per group (docs/methods.md section 3).

    Mutates: ``reference`` only when ``update_reference`` is given (after scoring).

    ``JSD(p, q) = sqrt(0.5 KL(p||m) + 0.5 KL(q||m))``, ``m = (p + q) / 2``, in nats (range
    ``[0, sqrt(ln 2)]``) or, with ``base="2"``, bits (range ``[0, 1]``).

    ``drift_mode``:
        ``"mass"``: ``p_i = |F_i| / sum |F|`` over the group's elements. Exact, no binning.
        ``"histogram"``: the paper's: ``log10(|x| + 1e-12)`` of both snapshots, ``bins`` equal
        bins between the ``lower_q`` and ``upper_q`` quantiles (numpy's linear interpolation)
        of the union of both snapshots' values in the group, widened to ``min_log_range`` if
        narrower; values outside dropped; ``1e-12`` added to every bin; normalised. Near-
        constant groups (norms, biases) collapse onto the ``min_log_range`` floor, where noise
        drives the distance towards its maximum; a larger floor avoids that. The range is never
        empty: when ``min_log_range`` is below half an ulp of ``lo`` (e.g. ``1e-17`` with
        values near 10, ``lo ~ 1``), ``lo + min_log_range`` rounds back to ``lo``, and ``hi``
        is then the next float64 above ``lo`` (values equal to ``lo`` fall in the first bin,
        values equal to ``hi`` in the last), on both backends and in
        :func:`fisheradaptune.reference.js_drift`.

    A group whose Fisher sums to 0 on either side has distance 0. Fisher values are taken by
    magnitude. ``current`` and ``reference`` share shapes and one floating dtype (float32 or
    bfloat16, or float64 on CPU). bfloat16 values are read widened to float32 (exact) and
    scored exactly as float32 values are; the reference update is computed in float32 and
    rounded once to bfloat16 (FisherAdapTune's ``fisher_dtype=torch.bfloat16``).

    Args:
        update_reference: if given as ``rho`` in [0, 1], also sets
            ``reference = rho * reference + (1 - rho) * current`` (every element of every tensor)
            after scoring, in the same call. Outside [0, 1] (or NaN) is a ``ValueError``. With an
            update, no ``reference`` tensor may share memory with another one (the same tensor
            twice included) or with any ``current`` tensor (a ``ValueError`` naming the later
            argument, raised before anything is written): the update runs in parallel chunks
            that would race with the scoring and with each other. Without an update nothing is
            written and any sharing is fine.

    Returns:
        float32 ``[layout.num_groups]`` on the tensors' device.
    """
    current = list(current)
    reference = list(reference)
    segments, num_groups = _segments(layout, current, "current", required=True)
    if base not in ("e", "2"):
        raise ValueError(f"argument 'base': expected \"e\" or \"2\", got {base!r}")
    return _ops.js_drift(current, reference, segments, num_groups, drift_mode, int(bins),
                         float(lower_q), float(upper_q), float(min_log_range), base == "2",
                         None if update_reference is None else float(update_reference))


@torch.library.register_fake("fisheradaptune::js_drift")
def _js_drift_fake(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                   num_groups: int, drift_mode: str, bins: int, lower_q: float, upper_q: float,
                   min_log_range: float, base2: bool, update_reference: Optional[float]) -> Tensor:
    device = _checks.validate_js_drift(current, reference, segments, num_groups, drift_mode, bins,
                                       lower_q, upper_q, min_log_range, base2, update_reference)
    return torch.empty(num_groups, dtype=torch.float32, device=device)


@_library.impl("js_drift", "ADInplaceOrView")
def _js_drift_inplace(current, reference, segments, num_groups, drift_mode, bins, lower_q,
                      upper_q, min_log_range, base2, update_reference):
    targets = _library.tensors(reference) if update_reference is not None else []
    _library.check_leaves("js_drift", targets, "reference")
    with _library.below_inplace():
        out = _ops.js_drift(current, reference, segments, num_groups, drift_mode, bins, lower_q,
                            upper_q, min_log_range, base2, update_reference)
    _library.bump(targets)
    return out


_library.register_not_differentiable("js_drift")


# ---------------------------------------------------------------------------------------------
# js_mass_totals and js_mass_partial (Note [Sharded drift] in csrc/drift/drift_math.h)


def js_mass_totals(current: Sequence[Tensor], reference: Sequence[Tensor],
                   layout: GroupLayout) -> Tensor:
    """Per group, ``sum |current|`` and ``sum |reference|`` over the elements given: float64
    ``[2, layout.num_groups]``. The first half of :func:`js_drift`'s ``"mass"`` mode.

    With :func:`js_mass_partial` it scores a group whose elements are spread over several
    tensors or processes (FSDP shards): both results add over any split of the elements, so
    sum (all-reduce) the totals, pass them to :func:`js_mass_partial`, sum its results, and
    ``sqrt`` gives the distance (see Note [Sharded drift] in csrc/drift/drift_math.h and
    :func:`fisheradaptune.distributed.js_drift`).
    """
    current, reference = list(current), list(reference)
    segments, num_groups = _segments(layout, current, "current", required=True)
    return _ops.js_mass_totals(current, reference, segments, num_groups)


@torch.library.register_fake("fisheradaptune::js_mass_totals")
def _js_mass_totals_fake(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                         num_groups: int) -> Tensor:
    device = _checks.validate_js_mass_totals(current, reference, segments, num_groups)
    return torch.empty(2, num_groups, dtype=torch.float64, device=device)


_library.register_not_differentiable("js_mass_totals")


def js_mass_partial(current: Sequence[Tensor], reference: Sequence[Tensor], layout: GroupLayout,
                    totals: Tensor, *, update_reference: Optional[float] = None) -> Tensor:
    """Per group, the sum of the JS^2 terms (nats) of the elements given, float64
    ``[layout.num_groups]``, with ``p = |current| / totals[0]`` and
    ``q = |reference| / totals[1]``; a group with a zero total gives 0. The second half of
    :func:`js_drift`'s ``"mass"`` mode: with ``totals = js_mass_totals(...)`` over the same
    tensors, ``sqrt`` of the result is ``js_drift(..., drift_mode="mass")``.

    Mutates: ``reference`` only when ``update_reference`` is given (as :func:`js_drift`).

    Args:
        totals: float64 ``[2, layout.num_groups]`` on the tensors' device, typically
            :func:`js_mass_totals` summed over shards.
        update_reference: as in :func:`js_drift`: ``reference = rho * reference +
            (1 - rho) * current`` after scoring, in the same pass; ``rho`` in [0, 1], and with
            an update no ``reference`` tensor may share memory with another one, with any
            ``current`` tensor or with ``totals`` (``ValueError``, nothing written).
    """
    current, reference = list(current), list(reference)
    segments, num_groups = _segments(layout, current, "current", required=True)
    if not isinstance(totals, Tensor):
        raise TypeError(f"argument 'totals': expected a Tensor, got {type(totals).__name__}")
    return _ops.js_mass_partial(current, reference, segments, num_groups, totals,
                                None if update_reference is None else float(update_reference))


@torch.library.register_fake("fisheradaptune::js_mass_partial")
def _js_mass_partial_fake(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                          num_groups: int, totals: Tensor,
                          update_reference: Optional[float]) -> Tensor:
    device = _checks.validate_js_mass_partial(current, reference, segments, num_groups, totals,
                                              update_reference)
    return torch.empty(num_groups, dtype=torch.float64, device=device)


@_library.impl("js_mass_partial", "ADInplaceOrView")
def _js_mass_partial_inplace(current, reference, segments, num_groups, totals, update_reference):
    targets = _library.tensors(reference) if update_reference is not None else []
    _library.check_leaves("js_mass_partial", targets, "reference")
    with _library.below_inplace():
        out = _ops.js_mass_partial(current, reference, segments, num_groups, totals,
                                   update_reference)
    _library.bump(targets)
    return out


_library.register_not_differentiable("js_mass_partial")


# ---------------------------------------------------------------------------------------------
# Fallback kernels (pure PyTorch, the same contract as the compiled ones)
#
# The kernels below are what ``torch.ops.fisheradaptune.js_drift`` / ``js_mass_totals`` /
# ``js_mass_partial`` run when the compiled library is not in use: each takes exactly its
# schema's arguments (csrc/schemas.cpp), makes the compiled op's checks (the ``validate_<op>``
# of :mod:`._checks`, then the rows of ``segments``, which only a kernel that reads data can
# check) and computes what csrc/drift/drift_*_cpu.cpp compute, in float64, the same way:
#
# - mass mode: per group ``C = sum |c|``, ``R = sum |r|`` summed per chunk of the plan
#   (``CHUNK`` elements of one segment), then per group in plan order; the terms
#   ``js_term(p, q)`` with ``p = (|c| * pre) * inv`` (Note [Tiny totals]) and ``js_term`` as the
#   CPU kernel's vectorised form (the series below 1/64 of ``d^2``, the log form above it);
#   ``js_drift``'s mass mode is the two halves, so ``sqrt`` of ``js_mass_partial`` over
#   ``js_mass_totals`` equals it bitwise here as well;
# - histogram mode: per group, order statistics of the union's log-magnitudes, numpy's linear
#   interpolation and Note [Histogram range] on host doubles (bitwise the C++'s arithmetic),
#   bins counted with ``torch.bincount`` up to 2^16 bins and, above (Note [Sparse histogram]),
#   over the occupied bins only (``torch.unique``), so 2^30 bins allocate nothing of that size;
# - the reference update ``ref = rho * ref + (1 - rho) * cur`` in the state's dtype with ``rho``
#   and ``1 - rho`` rounded to it, as ``ema_chunk`` spells it, over every element, after every
#   group is scored, written in place (bfloat16 state: in float32, rounded once on store).
#
# Results agree with the compiled CPU kernel to rounding (its SIMD lanes sum in another order and
# its logarithm is its own polynomial), not bitwise; a float32 distance almost always matches to
# the bit. Histogram bins use torch's log10 both for the values and for the quantiles taken from
# them, so the extreme values always fall inside [lo, hi], as they do in the C++. Every float
# reduction is a plain ``sum`` over fixed slices (no float atomics, no scatter; bin counts are
# integers): deterministic on every device, for any thread count.

import math as _math
from typing import Tuple


#: Elements per chunk of a plan (kChunk, csrc/common/plan.h); only the rounding of the sums depends on it.
_FB_CHUNK = _library.CHUNK
#: Note [Sparse histogram] (csrc/drift/drift_histogram_cpu.cpp): dense bin counts up to this many bins.
_FB_DENSE_BINS = 1 << 16
_FB_MIN_NORMAL = 2.2250738585072014e-308  # DBL_MIN
_FB_UP = 18014398509481984.0              # 2^54
_FB_LN2 = 0.69314718055994530942
# The series coefficients of f(d) / d^2 (js_term_simd, csrc/drift/drift_mass_cpu.cpp), Horner order.
_FB_SERIES = (1.0 / 120, 1.0 / 91, 1.0 / 66, 1.0 / 45, 1.0 / 28, 1.0 / 15, 1.0 / 6, 1.0)


def _fb_read_segments(op: str, segments: Tensor, numels: List[int],
                      num_groups: int) -> List[List[Tuple[int, int, int]]]:
    """The rows of ``segments`` checked as the C++ does (``_library.read_segments``), then per
    group its non-empty ``(tensor, begin, end)`` pieces in plan order (tensor, then begin). The
    rows are read on the host (Note [Segments on the host])."""
    by_group: List[List[Tuple[int, int, int]]] = [[] for _ in range(num_groups)]
    for t, b, e, g in _library.read_segments(op, "segments", segments, numels, num_groups):
        by_group[g].append((t, b, e))
    return by_group


def _fb_validate(op: str, validate, args: tuple, segments: Tensor, reference: List[Tensor],
                 num_groups: int):
    """``validate(*args)`` (the fake kernels' checks), then the rows of ``segments``, in the
    C++'s order: it reads the rows before its aliasing check, so an aliasing error of
    ``validate`` yields to a bad row. Returns (device, per-group pieces)."""
    try:
        device = validate(*args)
    except ValueError as e:
        if "shares memory with" in str(e):
            _fb_read_segments(op, segments, [r.numel() for r in reference], num_groups)
        raise
    return device, _fb_read_segments(op, segments, [r.numel() for r in reference], num_groups)


def _fb_flat(t: Tensor, b: int, e: int) -> Tensor:
    return t.reshape(-1)[b:e]


def _fb_group_sums(by_group, fn, device: torch.device, skip=None) -> Tensor:
    """float64 ``[G]``: per group, the sum in plan order of the chunk partials ``fn(t, b, e,
    g).sum()`` over the plan's chunks ``[b, e)`` (CHUNK elements of one piece at most) of its
    pieces; 0 for a group with none or one in ``skip``. Working chunk by chunk also keeps every
    temporary small: whole-tensor temporaries of a ViT's largest weights cost more in page faults
    than in arithmetic."""
    out = []
    zero = torch.zeros((), dtype=torch.float64, device=device)
    for g, pieces in enumerate(by_group):
        if not pieces or (skip is not None and skip[g]):
            out.append(zero)
            continue
        partials = [fn(t, b, min(b + _FB_CHUNK, e), g).sum(dtype=torch.float64)
                    for t, begin, e in pieces for b in range(begin, e, _FB_CHUNK)]
        out.append(torch.stack(partials).sum() if len(partials) > 1 else partials[0])
    if not out:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack(out)


def _fb_mass_scale(total: float) -> Tuple[float, float]:
    """mass_scale (Note [Tiny totals]): ``(pre, inv)`` with ``p = (|x| * pre) * inv``."""
    if total >= _FB_MIN_NORMAL:
        return 1.0, 1.0 / total
    return _FB_UP, 1.0 / (total * _FB_UP)


def _fb_magnitude(x: Tensor, pre: float, inv: float) -> Tensor:
    p = x.abs().to(torch.float64)
    if pre != 1.0:
        p.mul_(pre)  # a power of two: exact
    return p.mul_(inv)


def _fb_mass_terms(p: Tensor, q: Tensor) -> Tensor:
    """js_term_simd (csrc/drift/drift_mass_cpu.cpp) elementwise: ``s f(d) / 4`` with ``s = p + q``,
    ``d = (p - q) / s``; ``f`` by its series for ``d^2 < 1/64`` (no cancellation), else
    ``(1+d) ln(1+d) + (1-d) ln(1-d)`` (``0 ln 0 = 0``); 0 where ``s`` is not > 0 (NaN too)."""
    s = p + q
    d = (p - q).div_(s)
    u = d * d
    series = torch.full_like(u, 1.0 / 153)
    for c in _FB_SERIES:
        series.mul_(u).add_(c)
    series.mul_(u)
    # a ln a + b ln b with 0 ln 0 = 0: a, b are 0 or at least 2^-53, so the clamp changes no
    # other value
    a, b = 1.0 + d, 1.0 - d
    logs = a.clamp_min(1e-300).log_().mul_(a).add_(b.clamp_min(1e-300).log_().mul_(b))
    f = torch.where(u < 1.0 / 64, series, logs)
    scored = s > 0
    return torch.where(scored, s.mul_(f).mul_(0.25), 0.0)


def _fb_totals(current, reference, by_group, device) -> Tensor:
    """float64 ``[2, G]``: per group ``sum |current|`` and ``sum |reference|``."""
    rows = [_fb_group_sums(by_group, lambda t, b, e, g, side=side: _fb_flat(side[t], b, e).abs(),
                           device) for side in (current, reference)]
    return torch.stack(rows)


def _fb_partial(current, reference, by_group, totals: List[List[float]], device) -> Tensor:
    """float64 ``[G]``: per group the sum of the JS^2 terms against ``totals`` (host doubles);
    0 for a group whose totals are not both > 0."""
    scored = [tc > 0 and tr > 0 for tc, tr in zip(*totals)]
    scales = [(_fb_mass_scale(tc), _fb_mass_scale(tr)) if ok else None
              for tc, tr, ok in zip(*totals, scored)]

    def terms(t, b, e, g):
        (cpre, cinv), (rpre, rinv) = scales[g]
        return _fb_mass_terms(_fb_magnitude(_fb_flat(current[t], b, e), cpre, cinv),
                              _fb_magnitude(_fb_flat(reference[t], b, e), rpre, rinv))
    return _fb_group_sums(by_group, terms, device, skip=[not ok for ok in scored])


def _fb_distance(js_sq: Tensor, base2: bool) -> Tensor:
    """js_distance: JS^2 (nats) -> distance, float32; a NaN or negative JS^2 gives 0."""
    v = torch.where(js_sq > 0, js_sq, 0.0)
    return (torch.sqrt(v / _FB_LN2) if base2 else torch.sqrt(v)).to(torch.float32)


def _fb_update_reference(current, reference, rho: Optional[float]) -> None:
    """ema_chunk over every element: ``ref = rho * ref + (1 - rho) * cur`` in the state's dtype,
    each product and the sum rounded to it (no fused multiply-add), in place. bfloat16 state:
    the same in float32, rounded once to bfloat16 on store (Note [bfloat16 state])."""
    if rho is None:
        return
    for cur, ref in zip(current, reference):
        compute = torch.float32 if ref.dtype == torch.bfloat16 else ref.dtype
        r = torch.tensor(rho, dtype=compute)
        keep, take = float(r), float(1 - r)  # rho and 1 - rho rounded to the compute dtype
        if compute == ref.dtype:
            ref.mul_(keep).add_(cur * take)
        else:
            ref.copy_(ref.to(compute).mul_(keep).add_(cur.to(compute) * take))


def _fb_js_term(p: Tensor, q: Tensor) -> Tensor:
    """js_term<double> (csrc/drift/drift_math.h, Note [JS term]) elementwise, the histogram's form."""
    s = p + q
    d = (p - q) / s
    a = torch.where(d <= -1.0, 0.0, (1.0 + d) * torch.log1p(d))
    b = torch.where(d >= 1.0, 0.0, (1.0 - d) * torch.log1p(-d))
    return torch.where(s > 0, s * (a + b) * 0.25, 0.0)


def _fb_lerp_numpy(a: float, b: float, t: float) -> float:
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


def _fb_log_quantile(v: Tensor, q: float) -> float:
    """numpy.quantile(v, q), linear, as log_quantile (csrc/drift/drift_histogram_cpu.cpp) on host doubles."""
    n = v.numel()
    h = float(n - 1) * q
    i = int(_math.floor(h))
    if i + 1 >= n:
        return float(v.max())
    # The i-th and (i+1)-th smallest from the shorter end: a partial sort of a few percent of
    # the values is several times faster than two full selections (kthvalue).
    if i + 2 <= n - i:
        a, b = torch.topk(v, i + 2, largest=False, sorted=True).values[i:].tolist()
    else:
        b, a = torch.topk(v, n - i, largest=True, sorted=True).values[-2:].tolist()
    return _fb_lerp_numpy(a, b, h - float(i))


def _fb_bin_index(v: Tensor, lo: float, hi: float, bins: int) -> Tensor:
    """bin_of over a tensor: the bins of the values inside [lo, hi] (hi in the last bin)."""
    scale = bins / (hi - lo)  # hi > lo (Note [Histogram range]) or NaN: never a division by 0
    x = (v - lo) * scale
    x = x[(v >= lo) & (v <= hi) & (x >= 0)]
    return x.to(torch.int64).clamp_(max=bins - 1)


def _fb_histogram_js(c: Tensor, r: Tensor, bins: int, lower_q: float, upper_q: float,
                     min_log_range: float) -> Tensor:
    """JS^2 (nats, float64 0-d) of one group's histograms, docs/methods.md section 3."""
    lc = torch.log10(c.abs().to(torch.float64) + 1e-12)
    lr = torch.log10(r.abs().to(torch.float64) + 1e-12)
    union = torch.cat([lc, lr])
    lo = _fb_log_quantile(union, lower_q)
    hi = _fb_log_quantile(union, upper_q)
    # Note [Histogram range] (csrc/drift/drift_math.h): never an empty range.
    if hi - lo < min_log_range:
        hi = lo + min_log_range
    if not hi > lo:
        hi = _math.nextafter(lo, _math.inf)
    ic, ir = _fb_bin_index(lc, lo, hi, bins), _fb_bin_index(lr, lo, hi, bins)
    if bins <= _FB_DENSE_BINS:
        hc = torch.bincount(ic, minlength=bins).to(torch.float64).add_(1e-12)
        hr = torch.bincount(ir, minlength=bins).to(torch.float64).add_(1e-12)
        return _fb_js_term(hc / hc.sum(), hr / hr.sum()).sum()
    # Note [Sparse histogram]: the occupied bins, then every empty bin at once.
    occupied, inverse = torch.unique(torch.cat([ic, ir]), return_inverse=True)
    k = occupied.numel()
    hc = torch.bincount(inverse[:ic.numel()], minlength=k).to(torch.float64)
    hr = torch.bincount(inverse[ic.numel():], minlength=k).to(torch.float64)
    nc = float(ic.numel()) + float(bins) * 1e-12
    nr = float(ir.numel()) + float(bins) * 1e-12
    js = _fb_js_term((hc + 1e-12) / nc, (hr + 1e-12) / nr).sum()
    empty = _fb_js_term(torch.tensor([1e-12 / nc], dtype=torch.float64, device=c.device),
                        torch.tensor([1e-12 / nr], dtype=torch.float64, device=c.device))
    return js + float(bins - k) * empty[0]


def _js_drift_fallback(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                       num_groups: int, drift_mode: str, bins: int, lower_q: float,
                       upper_q: float, min_log_range: float, base2: bool,
                       update_reference: Optional[float]) -> Tensor:
    """``js_drift`` in PyTorch: the compiled kernel's checks and results (see above)."""
    device, by_group = _fb_validate(
        "js_drift", _checks.validate_js_drift,
        (current, reference, segments, num_groups, drift_mode, bins, lower_q, upper_q,
         min_log_range, base2, update_reference), segments, reference, num_groups)
    current = [c.contiguous() for c in current]  # read from copies made before any write
    with torch.no_grad():
        if drift_mode == "mass":
            totals = _fb_totals(current, reference, by_group, device)
            host = totals.cpu().tolist()
            js = _fb_partial(current, reference, by_group, host, device)
            out = _fb_distance(js, base2)
        else:
            js = []
            zero = torch.zeros((), dtype=torch.float64, device=device)
            for pieces in by_group:
                if not pieces:
                    js.append(zero)
                    continue
                c = torch.cat([_fb_flat(current[t], b, e) for t, b, e in pieces])
                r = torch.cat([_fb_flat(reference[t], b, e) for t, b, e in pieces])
                tc = c.abs().sum(dtype=torch.float64)
                tr = r.abs().sum(dtype=torch.float64)
                if not bool((tc > 0) & (tr > 0)):
                    js.append(zero)
                    continue
                js.append(_fb_histogram_js(c, r, bins, lower_q, upper_q, min_log_range))
            out = _fb_distance(torch.stack(js), base2) if js else \
                torch.zeros(0, dtype=torch.float32, device=device)
        _fb_update_reference(current, reference, update_reference)
    return out


def _js_mass_totals_fallback(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                             num_groups: int) -> Tensor:
    """``js_mass_totals`` in PyTorch: float64 ``[2, G]``."""
    device, by_group = _fb_validate(
        "js_mass_totals", _checks.validate_js_mass_totals,
        (current, reference, segments, num_groups), segments, reference, num_groups)
    with torch.no_grad():
        return _fb_totals(current, reference, by_group, device)


def _js_mass_partial_fallback(current: List[Tensor], reference: List[Tensor], segments: Tensor,
                              num_groups: int, totals: Tensor,
                              update_reference: Optional[float]) -> Tensor:
    """``js_mass_partial`` in PyTorch: float64 ``[G]``, then the reference update if asked."""
    device, by_group = _fb_validate(
        "js_mass_partial", _checks.validate_js_mass_partial,
        (current, reference, segments, num_groups, totals, update_reference), segments,
        reference, num_groups)
    current = [c.contiguous() for c in current]
    with torch.no_grad():
        host = totals.detach().cpu().tolist()
        out = _fb_partial(current, reference, by_group, host, device)
        _fb_update_reference(current, reference, update_reference)
    return out


FALLBACK_KERNELS = {
    "js_drift": _js_drift_fallback,
    "js_mass_totals": _js_mass_totals_fallback,
    "js_mass_partial": _js_mass_partial_fallback,
}
