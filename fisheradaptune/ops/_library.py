"""What every op family needs: the operator namespace, the one ``torch.library.Library`` that
holds the Python kernels, the wrappers' argument conversions, and the shared pieces of the
``ADInplaceOrView`` and ``Autograd`` kernels.

Every family module (:mod:`.fisher`, :mod:`.drift`, :mod:`.tokens`, :mod:`.sparse`) registers
its kernels when it is imported, through :func:`impl` (one kernel per op and dispatch key: a
second registration is a programming error, refused) or ``torch.library.register_fake`` /
``register_autograd``. :mod:`fisheradaptune.ops` imports every family, and
``import fisheradaptune`` imports it once, right after loading the compiled library, so direct
``torch.ops.fisheradaptune.*`` calls are covered as well as the typed wrappers.

Under the pure-PyTorch fallback (:mod:`fisheradaptune._loader`), :func:`register_fallbacks`
also registers each family's ``FALLBACK_KERNELS`` for the CPU and CUDA keys, where the compiled
library registers its C++ kernels; the fallback kernels share :func:`read_segments`,
:func:`check_not_capturing` and :func:`full_fp32_matmul` (the C++ kernels' plan, capture and
precision rules; the typed ``per_sample_grad_sq_`` uses the last one too) and size their work
by :data:`CHUNK` / :data:`BLOCK`.

Note [In-place writes]
~~~~~~~~~~~~~~~~~~~~~~
A kernel registered in C++ for CPU/CUDA writes into its ``Tensor(a!)`` arguments, but nothing
bumps their version counters, so autograd would not notice that a tensor it saved for backward
was overwritten and would silently compute wrong gradients. An ``ADInplaceOrView`` kernel per
mutating op (the dispatch key where torch's own in-place ops do this) runs the op below that
key, then bumps the version of every tensor it wrote (:func:`bump`). It also refuses, as
torch's in-place ops do, to write into a leaf that requires grad while grad mode is on
(:func:`check_leaves`).

Note [No derivative]
~~~~~~~~~~~~~~~~~~~~
An op with no kernel at the ``Autograd`` dispatch key gets PyTorch's fallback, which marks its
outputs as requiring grad when an input does and, at backward, leaves the inputs' ``.grad`` at
``None`` with only a warning: a drift used in a loss would contribute nothing, silently. Each op
without a derivative therefore gets an ``Autograd`` kernel that says what it does with inputs
that require grad, before it runs:

- **Statistics** (``fisher_accumulate_``, ``per_sample_grad_sq_``; :func:`register_statistic`)
  treat their inputs as data: they accumulate squared gradients into a Fisher buffer, a
  quantity nothing differentiates through (under ``loss.backward(create_graph=True)`` the
  ``.grad`` they read requires grad). They run below autograd, so what they write never
  requires grad.
- **Distances and backward helpers** (``js_drift``, ``js_mass_totals``, ``js_mass_partial``,
  ``token_prune_merge_backward``, ``bipartite_merge_backward``;
  :func:`register_not_differentiable`) refuse, with grad mode on, an input that requires grad,
  naming the op and the argument: their derivatives are not implemented, and a result that
  would not carry one must not look as if it did. Detach the inputs or call them under
  ``torch.no_grad()``. (Higher-order gradients through the token ops never reach their
  ``*_backward`` ops: see :mod:`.tokens`.)

:data:`STATISTICS` and :data:`NOT_DIFFERENTIABLE` list the ops registered each way.
"""
from __future__ import annotations

import contextlib
import operator
from types import ModuleType
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _loader
from ..groups import GroupLayout
from ._schemas import SCHEMAS

__all__: List[str] = []

#: The operator namespace (``torch.ops.fisheradaptune``).
OPS = torch.ops.fisheradaptune

#: Ops whose tensor inputs are data: run below autograd, outputs never require grad.
STATISTICS: List[str] = []
#: Ops that refuse an input requiring grad while grad mode is on.
NOT_DIFFERENTIABLE: List[str] = []

# Note [Chunk and block sizes] (csrc/common/plan.h), the same values in Python, for the fallback kernels
# and for tests that size their edge cases (a test checks they equal the compiled library's).
#: Elements per chunk: the unit of parallel work and of deterministic per-group reduction.
CHUNK = 1 << 15
#: Elements per block: the CPU kernels' float-lane accumulation length before a double flush.
BLOCK = 1024

# The one library every Python kernel is registered on (kept alive: dropping it deregisters).
_LIB = torch.library.Library("fisheradaptune", "IMPL")
_REGISTERED: Dict[Tuple[str, str], Callable] = {}


def impl(name: str, key: str) -> Callable[[Callable], Callable]:
    """Decorator: register the function as ``fisheradaptune::<name>``'s kernel for the dispatch
    key ``key``, once (a second kernel for the same op and key raises instead of replacing)."""
    def register(fn: Callable) -> Callable:
        if (name, key) in _REGISTERED:
            raise RuntimeError(f"fisheradaptune::{name} already has a kernel for {key} "
                               f"({_REGISTERED[name, key].__qualname__})")
        _LIB.impl(name, fn, key)
        _REGISTERED[name, key] = fn
        return fn
    return register


# ---------------------------------------------------------------------------------------------
# The typed wrappers' argument conversions


def count(op: str, arg: str, v) -> int:
    """An int argument as an int: a float or bool is refused rather than truncated (``r=2.7``
    would otherwise merge 2 tokens without a word). SymInts pass, for dynamic shapes."""
    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
        return v
    try:
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)  # numpy integers and other index-like values
    except TypeError:
        raise TypeError(f"fisheradaptune.{op}: argument '{arg}': expected an int, got "
                        f"{type(v).__name__} {v!r}") from None


def segments(layout: Optional[GroupLayout], tensors: Sequence[Optional[Tensor]], arg: str,
             required: bool = False):
    """``(segments, num_groups)`` of ``layout`` after checking it describes ``tensors``;
    ``(None, 0)`` without a layout when none is required."""
    if layout is None and not required:
        return None, 0
    if not isinstance(layout, GroupLayout):
        raise TypeError(f"argument 'layout': expected a GroupLayout, got {type(layout).__name__}")
    layout.check_tensors(tensors, arg=arg)
    # Kernels plan their work on the host, so the CPU copy is the one to pass (no sync).
    return layout.segments, layout.num_groups


# ---------------------------------------------------------------------------------------------
# ADInplaceOrView kernels (Note [In-place writes])


def tensors(*items) -> List[Tensor]:
    """The tensors among ``items`` (tensors and lists of tensors or None)."""
    out = []
    for it in items:
        if isinstance(it, Tensor):
            out.append(it)
        elif isinstance(it, (list, tuple)):
            out.extend(t for t in it if isinstance(t, Tensor))
    return out


def check_leaves(op: str, targets: List[Tensor], arg: str) -> None:
    """Refuse, with grad mode on, to write in place into a leaf that requires grad."""
    if not torch.is_grad_enabled():
        return
    for t in targets:
        if t.requires_grad and t.is_leaf:
            raise RuntimeError(f"fisheradaptune.{op}: argument '{arg}': a leaf tensor that "
                               "requires grad cannot be written in place (detach it, or call "
                               "under torch.no_grad())")


def bump(targets: List[Tensor]) -> None:
    """Bump the version counters of the tensors an op wrote."""
    if targets:
        torch.autograd.graph.increment_version(targets)


def below_inplace():
    """The context in which an ``ADInplaceOrView`` kernel calls its op."""
    return torch._C._AutoDispatchBelowADInplaceOrView()


# ---------------------------------------------------------------------------------------------
# Autograd kernels of the ops without a derivative (Note [No derivative])


def _requiring_grad(schema, args, kwargs) -> Iterator[str]:
    """Names of the read-only tensor arguments that require grad."""
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            continue  # written in place: the ADInplaceOrView kernel refuses a leaf needing grad
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        items = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(t, Tensor) and t.requires_grad for t in items):
            yield arg.name


def register_statistic(name: str) -> None:
    """Register ``name``'s Autograd kernel as a statistic: it runs below autograd."""
    op = getattr(OPS, name).default

    def kernel(*args, **kwargs):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args, **kwargs)
    impl(name, "Autograd")(kernel)
    STATISTICS.append(name)


def register_not_differentiable(name: str) -> None:
    """Register ``name``'s Autograd kernel as refusing an input that requires grad."""
    op = getattr(OPS, name).default

    def kernel(*args, **kwargs):
        if torch.is_grad_enabled():
            for arg in _requiring_grad(op._schema, args, kwargs):
                raise RuntimeError(
                    f"fisheradaptune.{name}: argument '{arg}' requires grad, but {name} is not "
                    "differentiable (its result would carry no gradient); pass detached "
                    "tensors (.detach()) or call it under torch.no_grad()")
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args, **kwargs)
    impl(name, "Autograd")(kernel)
    NOT_DIFFERENTIABLE.append(name)


# ---------------------------------------------------------------------------------------------
# The pure-PyTorch fallback (registered only when the compiled library is not in use)


def register_fallback(kernels: Dict[str, Callable],
                      keys: Sequence[str] = ("CPU", "CUDA")) -> None:
    """Register each ``{op name: kernel}`` as the op's kernel for the dispatch ``keys`` (by
    default CPU and CUDA, the keys of the compiled kernels). A name that is not an op is
    refused."""
    for name, fn in kernels.items():
        if name not in SCHEMAS:
            raise ValueError(f"register_fallback: {name!r} is not a fisheradaptune op; expected "
                             f"one of {sorted(SCHEMAS)}")
        for key in keys:
            impl(name, key)(fn)


def _missing(name: str) -> Callable:
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"fisheradaptune.{name}: this build has no pure-PyTorch fallback for the op, and the "
            f"compiled operators are not in use ({_loader.fallback_reason()})")
    kernel.__qualname__ = f"_missing_{name}"
    return kernel


def register_fallbacks(families: Iterable[ModuleType],
                       keys: Sequence[str] = ("CPU", "CUDA")) -> None:
    """Register every family's ``FALLBACK_KERNELS`` (:func:`register_fallback`) for the dispatch
    ``keys`` (only "CUDA" when the compiled CPU kernels run but the CUDA ones do not); an op that
    no family covers gets a kernel raising ``NotImplementedError`` that names it, never
    silence."""
    covered: Dict[str, str] = {}
    for family in families:
        kernels = getattr(family, "FALLBACK_KERNELS", {})
        for name in kernels:
            if name in covered:
                raise RuntimeError(f"fisheradaptune.{name}: fallback kernels in both "
                                   f"{covered[name]} and {family.__name__}")
            covered[name] = family.__name__
        register_fallback(kernels, keys)
    register_fallback({name: _missing(name) for name in SCHEMAS if name not in covered}, keys)


def read_segments(op: str, arg: str, segments: Tensor, numels: Sequence[int],
                  num_groups: int) -> List[Tuple[int, int, int, int]]:
    """read_segments (csrc/common/validate.cpp) with the data: the rows ``(tensor, begin, end, group)`` of
    an int64 ``[S, 4]`` layout, checked against the tensor sizes and the number of groups
    (``ValueError`` naming ``arg``, the C++ messages), without empty rows, sorted by
    ``(tensor, begin)`` and checked not to overlap. A CUDA tensor is copied to the host (a
    synchronisation, as in the C++). The dtype/shape/device checks are the caller's
    (``_checks.validate_<op>``)."""
    rows = segments.detach().cpu().tolist()
    out = []
    for r, (t, begin, end, group) in enumerate(rows):
        if not 0 <= t < len(numels):
            raise ValueError(f"fisheradaptune.{op}: argument '{arg}': row {r}: tensor_index {t} "
                             f"is out of range for {len(numels)} tensors")
        if not (0 <= begin <= end <= numels[t]):
            raise ValueError(f"fisheradaptune.{op}: argument '{arg}': row {r}: range [{begin}, "
                             f"{end}) is out of bounds for tensor {t} with {numels[t]} elements")
        if not 0 <= group < num_groups:
            raise ValueError(f"fisheradaptune.{op}: argument '{arg}': row {r}: group_id {group} "
                             f"is out of range for {num_groups} groups")
        if begin < end:
            out.append((t, begin, end, group))
    out.sort(key=lambda s: (s[0], s[1]))  # stable, as std::stable_sort
    for a, b in zip(out, out[1:]):
        if a[0] == b[0] and a[2] > b[1]:
            raise ValueError(f"fisheradaptune.{op}: argument '{arg}': segments [{a[1]}, {a[2]}) "
                             f"and [{b[1]}, {b[2]}) of tensor {a[0]} overlap")
    return out


def check_not_capturing(op: str, why: str, device: torch.device) -> None:
    """Note [No CUDA-graph capture] (csrc/common/multi_tensor.cuh): an op that reads values back
    to the host cannot be captured; refuse before anything is done, with the C++ message."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"fisheradaptune.{op}: cannot be captured in a CUDA graph (the current "
                           f"stream is capturing): {why}. Call it outside the captured region.")


@contextlib.contextmanager
def full_fp32_matmul():
    """Note [Full fp32 per-sample GEMM] (csrc/fisher/per_sample_grad_sq.cpp): float32 matmuls in
    full IEEE fp32 (no TF32 on CUDA, no bfloat16 on CPU) for the duration, the caller's settings
    restored afterwards, also on error. Process-global. Used around the compiled op by the typed
    wrapper ``per_sample_grad_sq_`` (the stable C++ API cannot set the precision) and by the
    fallback kernel.

    torch keeps two settings: the legacy ``torch.set_float32_matmul_precision`` and the
    per-backend ``fp32_precision`` flags of cuBLAS and oneDNN matmuls. Setting only cuBLAS's flag
    to ``"ieee"`` under ``"high"`` would leave the two disagreeing, which torch refuses in cuBLAS
    matmuls (a RuntimeError about mixing the legacy and new TF32 APIs), so
    ``set_float32_matmul_precision("highest")`` sets both together. Where the caller has already
    made them disagree by setting a flag directly (torch then refuses to read the legacy
    setting), only the flags are set. Afterwards the legacy setting and each flag (where this
    torch has them) are restored exactly. Nothing is changed when all already say full fp32."""
    flags = [backend for backend in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
             if hasattr(backend, "fp32_precision")]
    saved_flags = [backend.fp32_precision for backend in flags]
    try:
        saved: Optional[str] = torch.get_float32_matmul_precision()
    except RuntimeError:  # a flag set directly disagrees with the legacy setting
        saved = None
    if saved == "highest" and all(flag == "ieee" for flag in saved_flags):
        yield
        return
    if saved is None:
        for backend in flags:
            backend.fp32_precision = "ieee"
    else:
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if saved is not None:
            torch.set_float32_matmul_precision(saved)
        for backend, flag in zip(flags, saved_flags):
            backend.fp32_precision = flag
