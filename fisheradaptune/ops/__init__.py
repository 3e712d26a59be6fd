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

Mutation, said the same way everywhere: an op whose name ends in ``_`` always writes into its
first argument(s) in place; an op that writes into an argument only on request
(``update_reference=``) says so in a "Mutates:" line of its docstring. Every other argument is
read only.
"""

from .fisher import fisher_accumulate_, per_sample_grad_sq_
from .drift import js_drift, js_mass_partial, js_mass_totals
from .tokens import bipartite_merge, token_prune_merge
from .sparse import sampled_grad

__all__ = ["fisher_accumulate_", "js_drift", "js_mass_totals", "js_mass_partial",
           "per_sample_grad_sq_", "token_prune_merge", "bipartite_merge", "sampled_grad"]
