"""Typed Python entry points of the ``torch.ops.fisheradaptune`` operators, one module per op
family:

- :mod:`.fisher`: ``fisher_accumulate_``, ``per_sample_grad_sq_``;
- :mod:`.drift`: ``js_drift``, ``js_mass_totals``, ``js_mass_partial``;
- :mod:`.tokens`: ``token_prune_merge``, ``bipartite_merge`` (and their ``*_backward`` ops);
- :mod:`.sparse`: ``sampled_grad``.

Each family module holds its ops' whole Python side: the typed wrappers (they validate what only
Python knows, the layout, allocate the outputs and call the registered op; the C++ side
validates every tensor argument before it writes anything), the fake kernels (for torch.compile
and meta tensors, with the argument checks of :mod:`._checks`, the Python twin of the C++
validation), the autograd formulas, and the ``ADInplaceOrView`` / ``Autograd`` kernels that keep
autograd honest about in-place writes and missing derivatives (:mod:`._library`). Importing this
package registers all of them, once (``import fisheradaptune`` does, right after loading the
compiled library), so direct ``torch.ops.fisheradaptune.*`` calls are covered too. Every op has a
float64 twin of the same name in :mod:`fisheradaptune.reference`, the independent oracle of the
tests.

Every family module also ends with its fallback kernels (pure PyTorch, the same contract as the
compiled ones: the same checks and messages, results to rounding, non-finite skipping and
counting, determinism, in-place writes), gathered in its ``FALLBACK_KERNELS``. They are
registered for the CPU and CUDA dispatch keys only when the compiled library is not in use
(:func:`fisheradaptune.has_compiled_ops`; :mod:`fisheradaptune._loader`); the fake, autograd and
in-place kernels above them are the same either way.

Mutation, said the same way everywhere: an op whose name ends in ``_`` always writes into its
first argument(s) in place; an op that writes into an argument only on request
(``update_reference=``) says so in a "Mutates:" line of its docstring. Every other argument is
read only.
"""

import torch

from .. import _loader
from . import _schemas

# The ops must exist before the families register kernels for them: the compiled library, or
# the schemas of ._schemas for the fallback.
_loader.load(_schemas.NAMESPACE, _schemas.SCHEMAS)

from . import _library, drift, fisher, sparse, tokens  # noqa: E402
from .fisher import fisher_accumulate_, per_sample_grad_sq_  # noqa: E402
from .drift import js_drift, js_mass_partial, js_mass_totals  # noqa: E402
from .tokens import bipartite_merge, token_prune_merge  # noqa: E402
from .sparse import sampled_grad  # noqa: E402

#: The op families, each a module with its ops' Python side and ``FALLBACK_KERNELS``.
FAMILIES = (fisher, drift, tokens, sparse)

if not _loader.has_compiled_ops():
    _library.register_fallbacks(FAMILIES)
elif torch.version.cuda is not None and not _loader.has_cuda_kernels():
    # The compiled CPU kernels run; tensors on CUDA get the pure-PyTorch kernels (_loader).
    _library.register_fallbacks(FAMILIES, keys=("CUDA",))

__all__ = ["fisher_accumulate_", "js_drift", "js_mass_totals", "js_mass_partial",
           "per_sample_grad_sq_", "token_prune_merge", "bipartite_merge", "sampled_grad"]
