"""Pure-PyTorch twins of every operator: slow, obvious, and the oracle the tests compare with.

Each function has the signature and semantics of its namesake in :mod:`fisheradaptune.ops`
and works on CPU and CUDA tensors alike. Reductions are done in float64.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .groups import GroupLayout

__all__ = ["fisher_accumulate_", "js_drift", "js_mass_totals", "js_mass_partial",
           "per_sample_grad_sq_", "js_distance", "log_quantile", "token_prune_merge"]


def _group_values(tensors: Sequence[Tensor], layout: GroupLayout, g: int) -> Tensor:
    parts = [tensors[t].reshape(-1)[b:e] for t, b, e in layout.segments_of(g)]
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([p.to(torch.float64).cpu() for p in parts])


def fisher_accumulate_(fisher: Sequence[Tensor], grads: Sequence[Optional[Tensor]], *,
                       decay: float, scale: float,
                       layout: Optional[GroupLayout] = None) -> Tuple[Optional[Tensor], Tensor]:
    """Reference of :func:`fisheradaptune.ops.fisher_accumulate_`. bfloat16 state: the update
    in float32, rounded once to bfloat16; an update that rounds to Inf is skipped."""
    skipped = 0
    for f, g in zip(fisher, grads):
        if g is None:
            continue
        compute = torch.float32 if f.dtype == torch.bfloat16 else f.dtype
        g = g.to(compute)
        updated = (decay * f.to(compute) + scale * g * g).to(f.dtype)
        ok = torch.isfinite(updated)
        skipped += int((~ok).sum())
        f.copy_(torch.where(ok, updated, f))
    device = fisher[0].device if len(fisher) else torch.device("cpu")
    nonfinite = torch.tensor(skipped, dtype=torch.int64, device=device)
    if layout is None:
        return None, nonfinite
    sums = torch.tensor([float(_group_values(fisher, layout, g).sum())
                         for g in range(layout.num_groups)], dtype=torch.float32, device=device)
    return sums, nonfinite


def js_distance(p: Tensor, q: Tensor, base: str = "e") -> float:
    """JS distance of two probability vectors (float64), with 0 log 0 = 0."""
    m = 0.5 * (p + q)
    js = 0.5 * (torch.xlogy(p, p / m).nansum() + torch.xlogy(q, q / m).nansum())
    js = max(float(js), 0.0)
    return math.sqrt(js / math.log(2.0)) if base == "2" else math.sqrt(js)


def log_quantile(values: Tensor, q: float) -> float:
    """``numpy.quantile(values, q)`` (linear) with numpy's own interpolation formula."""
    v, _ = torch.sort(values)
    n = v.numel()
    h = (n - 1) * q
    i = math.floor(h)
    a = float(v[i])
    if i + 1 >= n:
        return a
    b = float(v[i + 1])
    t = h - i
    return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t


def _histogram(v: Tensor, lo: float, hi: float, bins: int) -> Tensor:
    inside = (v >= lo) & (v <= hi)
    idx = ((v[inside] - lo) * (bins / (hi - lo))).floor().clamp(max=bins - 1).long()
    return torch.bincount(idx, minlength=bins).to(torch.float64)


def _update_reference(current: Sequence[Tensor], reference: Sequence[Tensor],
                      rho: Optional[float]) -> None:
    if rho is not None:
        for cur, ref in zip(current, reference):
            # bfloat16 state: computed in float32, rounded once on store.
            compute = torch.float32 if ref.dtype == torch.bfloat16 else ref.dtype
            ref.copy_(float(rho) * ref.to(compute) + (1.0 - float(rho)) * cur.to(compute))


def js_drift(current: Sequence[Tensor], reference: Sequence[Tensor], layout: GroupLayout, *,
             drift_mode: str = "mass", bins: int = 64, lower_q: float = 0.01, upper_q: float = 0.99,
             min_log_range: float = 1e-3, base: str = "e",
             update_reference: Optional[float] = None) -> Tensor:
    """Reference of :func:`fisheradaptune.ops.js_drift` (docs/methods.md section 3)."""
    out = []
    for g in range(layout.num_groups):
        c = _group_values(current, layout, g).abs()
        r = _group_values(reference, layout, g).abs()
        if not (c.sum() > 0 and r.sum() > 0):
            out.append(0.0)
            continue
        if drift_mode == "mass":
            out.append(js_distance(c / c.sum(), r / r.sum(), base))
            continue
        lc, lr = torch.log10(c + 1e-12), torch.log10(r + 1e-12)
        union = torch.cat([lc, lr])
        lo, hi = log_quantile(union, lower_q), log_quantile(union, upper_q)
        if hi - lo < min_log_range:
            hi = lo + min_log_range
        if not hi > lo:  # min_log_range below half an ulp of lo: the narrowest non-empty range
            hi = math.nextafter(lo, math.inf)
        hc = _histogram(lc, lo, hi, bins) + 1e-12
        hr = _histogram(lr, lo, hi, bins) + 1e-12
        out.append(js_distance(hc / hc.sum(), hr / hr.sum(), base))
    _update_reference(current, reference, update_reference)
    device = current[0].device if len(current) else torch.device("cpu")
    return torch.tensor(out, dtype=torch.float32, device=device)


def js_mass_totals(current: Sequence[Tensor], reference: Sequence[Tensor],
                   layout: GroupLayout) -> Tensor:
    """Reference of :func:`fisheradaptune.ops.js_mass_totals`."""
    rows = [[float(_group_values(side, layout, g).abs().sum()) for g in range(layout.num_groups)]
            for side in (current, reference)]
    device = current[0].device if len(current) else torch.device("cpu")
    return torch.tensor(rows, dtype=torch.float64, device=device).reshape(2, layout.num_groups)


def js_mass_partial(current: Sequence[Tensor], reference: Sequence[Tensor], layout: GroupLayout,
                    totals: Tensor, *, update_reference: Optional[float] = None) -> Tensor:
    """Reference of :func:`fisheradaptune.ops.js_mass_partial`: per group, the sum over the
    given elements of ``p log(2p/(p+q)) / 2 + q log(2q/(p+q)) / 2`` (JS^2 terms, nats)."""
    t = totals.detach().double().cpu()
    out = []
    for g in range(layout.num_groups):
        if not (t[0, g] > 0 and t[1, g] > 0):
            out.append(0.0)
            continue
        p = _group_values(current, layout, g).abs() / t[0, g]
        q = _group_values(reference, layout, g).abs() / t[1, g]
        m = 0.5 * (p + q)
        out.append(float(0.5 * (torch.xlogy(p, p / m).nansum() + torch.xlogy(q, q / m).nansum())))
    _update_reference(current, reference, update_reference)
    device = current[0].device if len(current) else torch.device("cpu")
    return torch.tensor(out, dtype=torch.float64, device=device)


def per_sample_grad_sq_(fisher: Tensor, x: Tensor, grad_out: Tensor, *,
                        scale: float = 1.0) -> Tensor:
    """Reference of :func:`fisheradaptune.ops.per_sample_grad_sq_` (materialises every g_n).

    Sums in float64, then applies the op's skip rule in the Fisher's dtype: an element is
    skipped (and counted) when its sum of squares or its updated value is not finite there."""
    if x.dim() == 2:
        x, grad_out = x.unsqueeze(1), grad_out.unsqueeze(1)
    nonfinite = torch.zeros((), dtype=torch.int64, device=fisher.device)
    if x.shape[0] == 0 or x.shape[1] == 0 or fisher.numel() == 0:
        return nonfinite  # no update: nothing written or counted
    g = torch.einsum("nto,nti->noi", grad_out.to(torch.float64), x.to(torch.float64))
    sq = (g * g).sum(0)
    updated = (fisher.to(torch.float64) + scale * sq).to(fisher.dtype)
    ok = torch.isfinite(sq.to(fisher.dtype)) & torch.isfinite(updated)
    fisher.copy_(torch.where(ok, updated, fisher))
    nonfinite.fill_(int((~ok).sum()))
    return nonfinite


def token_prune_merge(x: Tensor, scores: Tensor, keep: int, *, num_protected: int = 1,
                      sizes: Optional[Tensor] = None,
                      normalize: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`fisheradaptune.ops.token_prune_merge` (docs/methods.md section 6).

    Eager composition: a stable descending sort for the selection (ties to the lower index; NaN
    first), gathers, and a weighted sum in float64. Differentiable through autograd.
    """
    b, n, c = x.shape
    p = int(num_protected)
    m = n - p
    if not 0 <= p < n:
        raise ValueError(f"argument 'num_protected': expected 0 <= num_protected < N = {n}, got {p}")
    if not 0 <= keep <= m:
        raise ValueError(f"argument 'keep': expected 0 <= keep <= {m}, got {keep}")
    if sizes is None:
        sizes = torch.ones(b, n, dtype=torch.float32, device=x.device)
    order = torch.sort(scores.detach().to(torch.float64), dim=1, descending=True,
                       stable=True).indices
    kept = order[:, :keep].sort(dim=1).values
    merged = order[:, keep:].sort(dim=1).values
    cand = x[:, p:]
    rows = [x[:, :p], torch.gather(cand, 1, kept.unsqueeze(-1).expand(b, keep, c))]
    cand_sizes = sizes[:, p:]
    out_sizes = [sizes[:, :p].float(), torch.gather(cand_sizes, 1, kept).float()]
    if keep < m:
        xm = torch.gather(cand, 1, merged.unsqueeze(-1).expand(b, m - keep, c)).to(torch.float64)
        sm = torch.gather(cand_sizes, 1, merged).to(torch.float64)
        w = torch.gather(scores, 1, merged).to(torch.float64) * sm
        coef = w
        if normalize:
            total = w.sum(1, keepdim=True)
            zero = total == 0
            coef = torch.where(zero, torch.zeros_like(w),
                               w / torch.where(zero, torch.ones_like(total), total))
        # Note [Zero coefficients] (csrc/tokens/token_prune_merge.h): a token of coefficient 0 takes part with its
        # non-finite values read as 0 (so a W == 0 row is zeros). Masking xm itself, not just the
        # product, keeps 0 * inf out of the backward too.
        taken = (coef != 0).unsqueeze(-1) | torch.isfinite(xm)
        xm = torch.where(taken, xm, torch.zeros_like(xm))
        fused = (coef.unsqueeze(-1) * xm).sum(1)
        rows.append(fused.to(x.dtype).unsqueeze(1))
        out_sizes.append(sm.sum(1, keepdim=True).float())
    return torch.cat(rows, 1), kept, torch.cat(out_sizes, 1)


__all__.append("bipartite_merge")


def _unit_rows(metric: Tensor) -> Tensor:
    """Unit vectors of metric's rows in float64: zero rows stay zero, rows with inf or NaN
    become NaN (Note [Bipartite merge])."""
    m = metric.detach().to(torch.float64)
    top = m.abs().amax(-1, keepdim=True) if m.shape[-1] else m.new_zeros(*m.shape[:-1], 1)
    bad = ~torch.isfinite(m).all(-1, keepdim=True)
    m = m / torch.where(top > 0, top, torch.ones_like(top))
    norm = m.norm(dim=-1, keepdim=True)
    m = m / torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where(bad, torch.full_like(m, float("nan")), m)


def bipartite_merge(x: Tensor, metric: Tensor, r: int, *, num_protected: int = 1,
                    sizes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`fisheradaptune.ops.bipartite_merge` (docs/methods.md section 7).

    Eager composition in float64: a similarity matmul, stable descending sorts for both choices
    (NaN first, ties to the lower index), and scatter-adds for the weighted means.
    Differentiable in ``x`` through autograd.
    """
    b, n, c = x.shape
    p = int(num_protected)
    if not 0 <= p <= n:
        raise ValueError(f"argument 'num_protected': expected 0 <= num_protected <= N = {n}, got {p}")
    # ToMe's partition over all tokens: sources = even positions >= p, destinations = odd ones.
    pos = torch.arange(n, device=x.device)
    ia, ib = pos[(pos % 2 == 0) & (pos >= p)], pos[(pos % 2 == 1) & (pos >= p)]
    na, nb = len(ia), len(ib)
    if not 0 <= r <= min(na, nb):
        raise ValueError(f"argument 'r': expected 0 <= r <= {min(na, nb)}, got {r}")
    dev = x.device
    if sizes is None:
        sizes = torch.ones(b, n, dtype=torch.float32, device=dev)
    merged = torch.zeros(b, na, dtype=torch.bool, device=dev)
    match = torch.zeros(b, na, dtype=torch.int64, device=dev)
    if r > 0:
        unit = _unit_rows(metric)
        sim = unit[:, ia] @ unit[:, ib].transpose(1, 2)  # [b, na, nb]
        match = torch.sort(sim, dim=2, descending=True, stable=True).indices[..., 0]
        best = sim.gather(2, match.unsqueeze(-1)).squeeze(-1)
        order = torch.sort(best, dim=1, descending=True, stable=True).indices
        merged.scatter_(1, order[:, :r], True)
    first_b = p + na - r
    dest = torch.empty(b, n, dtype=torch.int64, device=dev)
    dest[:, :p] = torch.arange(p, device=dev)
    kept_pos = p + torch.cumsum((~merged).long(), 1) - 1
    dest[:, ia] = torch.where(merged, first_b + match, kept_pos)
    dest[:, ib] = first_b + torch.arange(nb, device=dev)
    rows = n - r
    s = sizes.to(torch.float64)
    total = torch.zeros(b, rows, dtype=torch.float64, device=dev).scatter_add(1, dest, s)
    count = torch.zeros(b, rows, dtype=torch.float64, device=dev).scatter_add(1, dest, torch.ones_like(s))
    w_row, n_row = total.gather(1, dest), count.gather(1, dest)
    coef = torch.where(n_row == 1, torch.ones_like(s),
                       torch.where(w_row != 0, s / torch.where(w_row != 0, w_row, 1.0), 0.0))
    # Note [Zero coefficients] (csrc/tokens/token_prune_merge.h): a source of coefficient 0 adds nothing, even
    # with inf/NaN values; masking x itself keeps 0 * inf out of the backward too.
    xs = x.to(torch.float64)
    xs = torch.where((coef != 0).unsqueeze(-1) | torch.isfinite(xs), xs, torch.zeros_like(xs))
    out = torch.zeros(b, rows, c, dtype=torch.float64, device=dev).scatter_add(
        1, dest.unsqueeze(-1).expand(b, n, c), coef.unsqueeze(-1) * xs)
    return out.to(x.dtype), total.float(), dest


__all__.append("sampled_grad")


def sampled_grad(grad_out: Tensor, x: Tensor, index: Tensor) -> Tensor:
    """Reference of :func:`fisheradaptune.ops.sampled_grad`: the dense gradient, then gather."""
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    dense = grad_out.to(torch.float64).T @ x.to(torch.float64)
    return dense.gather(1, index).to(dtype)
