"""TR-PTS parameter selection (docs/methods.md section 5): Fisher-ranked, row-balanced sparse
fine-tuning.

Usage::

    sel = selection.select_connections(model, batches, loss_fn, budget=0.005)
    print(sel.summary())
    params = sel.apply(model, mode="mask")
    opt = MaskedOptimizer(torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05), sel)

Algorithm (:func:`select_from_fisher`), over the weights of the chosen Linear modules:

1. ``F`` is a diagonal Fisher over calibration batches (:func:`fisheradaptune.fisher.estimate`).
2. The global top ``budget`` fraction of all their entries, ``k = max(1, round(budget * total))``
   entries, ties to the earlier entry (module order, then row-major index); ``k_l`` of them lie
   in layer ``l``.
3. ``C_l = min(in_features, max(c_min, round(k_l / out_features)))`` (round half up): layer
   ``l`` keeps as many entries as the top set holds in it, spread evenly over its rows, with at
   least ``c_min`` per row; a layer with ``k_l = 0`` gets ``min(c_min, in_features)``, or 0
   with ``skip_empty=True``.
4. Each output row of layer ``l`` keeps its top ``C_l`` input connections by ``F`` (ties: lower
   index). ``index[l]`` is int64 ``[out, C_l]``, each row sorted ascending.

So ``budget`` is the fraction of the chosen weights' entries selected: ``sum_l out_l * C_l``
equals ``k`` up to the rounding of each layer to whole rows (at most ``out_l / 2`` entries per
layer either way) and what the ``c_min`` floor adds; ``budget=1`` selects every entry. A
larger budget never selects less, and its selection contains the smaller one's: the top-k sets
are nested (one fixed order), so every ``k_l``, hence every ``C_l``, is non-decreasing in
``budget``, and a row's top ``C_l`` is a prefix of one fixed order.

Trainability (:meth:`Selection.apply`): the selected entries of the chosen weights; the chosen
modules' biases (``train_bias``) and the head's parameters (``train_head``) densely; everything
else (norms, embeddings, other modules) frozen.

Checks (``checks``): a saved selection is validated against itself on load and against the
model at ``apply``, before anything changes; peft models and selected weights tied to another
module are refused by name.

Modules: ``algorithm`` (the formula), ``checks`` (validation), ``result`` (:class:`Selection`:
file format, apply, merge), ``sparse_linear`` (:class:`SparseLinear`, compact mode),
``connections`` (:func:`select_connections`).
"""
from __future__ import annotations

from .algorithm import select_from_fisher
from .connections import select_connections
from .result import MODES, Selection
from .sparse_linear import SparseLinear

__all__ = ["Selection", "SparseLinear", "select_connections", "select_from_fisher", "MODES"]
