"""ViT token reduction: EViT / TR-PTS prune-merge (:func:`prune_merge`, docs/methods.md
section 6) and ToMe token merging (:func:`token_merge`, section 7), on the model families of one
registry (:func:`families`: exact classes, everything else refused at patch time).

Modules: ``_registry`` (the families), ``_layout`` (what a host library must say) and one
module per library (``_timm``, ``_torchvision``, ``_transformers``), ``_state`` (token sizes
carried with each token tensor), ``_patch`` (the patch base), ``_prune_merge``,
``_token_merge``.
"""
from ._patch import ATTR as _ATTR, Patch as _Patch
from ._prune_merge import PruneMergeHandle, cls_attention, prune_merge, sparse_layers
from ._registry import Family, families, register_family
from ._token_merge import TokenMergeHandle, token_merge

__all__ = ["prune_merge", "token_merge", "unpatch", "handle_of", "sparse_layers",
           "PruneMergeHandle", "TokenMergeHandle", "cls_attention", "families", "Family",
           "register_family"]


def handle_of(model) -> "_Patch | None":
    """The handle patching ``model`` (a :class:`PruneMergeHandle` or a
    :class:`TokenMergeHandle`), or None."""
    return model.__dict__.get(_ATTR)


def unpatch(model) -> None:
    """Undoes :func:`prune_merge` or :func:`token_merge` on ``model``, restoring it exactly."""
    handle = model.__dict__.get(_ATTR)
    if handle is None:
        raise ValueError("fisheradaptune.vit.unpatch: argument 'model': not patched by "
                         "fisheradaptune.vit.prune_merge or token_merge")
    handle.remove()
