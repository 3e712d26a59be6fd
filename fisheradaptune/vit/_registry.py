"""The registry of model families the ViT hooks serve: an allow-list of exact classes.

A model is patched only when its class is registered, every block and every block's attention
has a registered class, and its layout's checks pass (prefix tokens counted from the model's
own parameters, pool, attention implementation). Everything else is refused at patch time with
the model's class and the supported families; nothing is inferred from attribute names.

Classes are named ``"module:QualName"`` and resolved only when that module is already imported
(a model of the class exists only then), so the registry imports no host library.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Tuple, Union

from torch import nn

from ._layout import API_NAMES, Layout, Prefix, refusal
from ._timm import TimmDistilledLayout, TimmLayout
from ._torchvision import TorchvisionLayout
from ._transformers import (TransformersCLIPVisionLayout, TransformersDinov2Layout,
                            TransformersViTLayout)

ClassRef = Union[str, type]

LAYOUTS: Dict[str, Layout] = {
    "timm": TimmLayout(),
    "timm-distilled": TimmDistilledLayout(),
    "torchvision": TorchvisionLayout(),
    "transformers-vit": TransformersViTLayout(),
    "transformers-dinov2": TransformersDinov2Layout(),
    "transformers-clip-vision": TransformersCLIPVisionLayout(),
}


@dataclass(frozen=True)
class Family:
    """One supported model family.

    Attributes:
        name: what messages call it.
        layout: a key of ``LAYOUTS`` (how the library's blocks, attention, MLP, prefix tokens and
            pooling are reached).
        models: exact model classes (``"module:QualName"`` or the class), each mapped to the
            attribute holding its encoder (None: the model is the encoder; e.g. ``"vit"`` for
            transformers' ``ViTForImageClassification``).
        blocks: exact classes of its blocks.
        attentions: exact classes of its blocks' attention modules.
        methods: the hooks verified on it (``"prune_merge"``, ``"token_merge"``).
        tokens: its prefix tokens, in words (for messages and docs).
    """

    name: str
    layout: str
    models: Mapping[ClassRef, Optional[str]]
    blocks: Tuple[ClassRef, ...]
    attentions: Tuple[ClassRef, ...]
    methods: FrozenSet[str]
    tokens: str

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"Family {self.name!r}: layout {self.layout!r} is not one of "
                             f"{sorted(LAYOUTS)}")
        bad = set(self.methods) - set(API_NAMES)
        if bad or not self.methods:
            raise ValueError(f"Family {self.name!r}: methods must be a non-empty subset of "
                             f"{API_NAMES}, got {sorted(self.methods)}")
        if "token_merge" in self.methods and not LAYOUTS[self.layout].token_merge:
            raise ValueError(f"Family {self.name!r}: layout {self.layout!r} has no token-merge "
                             "block halves")


_BOTH = frozenset(API_NAMES)
_TOKEN = frozenset({"token_merge"})

_FAMILIES: List[Family] = [
    Family("timm VisionTransformer", "timm",
           {"timm.models.vision_transformer:VisionTransformer": None},
           ("timm.models.vision_transformer:Block",), ("timm.layers.attention:Attention",), _BOTH,
           "class token (optional: class_token=False) + register tokens; global_pool token, "
           "avg or ''"),
    Family("timm VisionTransformerDistilled (DeiT distilled)", "timm-distilled",
           {"timm.models.deit:VisionTransformerDistilled": None},
           ("timm.models.vision_transformer:Block",), ("timm.layers.attention:Attention",), _BOTH,
           "class + distillation tokens, both read by the head"),
    Family("torchvision VisionTransformer", "torchvision",
           {"torchvision.models.vision_transformer:VisionTransformer": None},
           ("torchvision.models.vision_transformer:EncoderBlock",),
           ("torch.nn.modules.activation:MultiheadAttention",), _BOTH, "class token"),
    Family("transformers ViT", "transformers-vit",
           {"transformers.models.vit.modeling_vit:ViTModel": None,
            "transformers.models.vit.modeling_vit:ViTForImageClassification": "vit"},
           ("transformers.models.vit.modeling_vit:ViTLayer",),
           ("transformers.models.vit.modeling_vit:ViTAttention",), _BOTH,
           "class token; eager or sdpa attention"),
    Family("transformers DeiT", "transformers-vit",
           {"transformers.models.deit.modeling_deit:DeiTModel": None,
            "transformers.models.deit.modeling_deit:DeiTForImageClassification": "deit",
            "transformers.models.deit.modeling_deit:DeiTForImageClassificationWithTeacher":
                "deit"},
           ("transformers.models.deit.modeling_deit:DeiTLayer",),
           ("transformers.models.deit.modeling_deit:DeiTAttention",), _BOTH,
           "class + distillation tokens; eager or sdpa attention"),
    Family("transformers AST", "transformers-vit",
           {"transformers.models.audio_spectrogram_transformer."
            "modeling_audio_spectrogram_transformer:ASTModel": None,
            "transformers.models.audio_spectrogram_transformer."
            "modeling_audio_spectrogram_transformer:ASTForAudioClassification":
                "audio_spectrogram_transformer"},
           ("transformers.models.audio_spectrogram_transformer."
            "modeling_audio_spectrogram_transformer:ASTLayer",),
           ("transformers.models.audio_spectrogram_transformer."
            "modeling_audio_spectrogram_transformer:ASTAttention",), _BOTH,
           "class + distillation tokens; eager or sdpa attention"),
    Family("transformers ViTMSN", "transformers-vit",
           {"transformers.models.vit_msn.modeling_vit_msn:ViTMSNModel": None,
            "transformers.models.vit_msn.modeling_vit_msn:ViTMSNForImageClassification": "vit"},
           ("transformers.models.vit_msn.modeling_vit_msn:ViTMSNLayer",),
           ("transformers.models.vit_msn.modeling_vit_msn:ViTMSNAttention",), _BOTH,
           "class token; eager or sdpa attention"),
    Family("transformers Dinov2", "transformers-dinov2",
           {"transformers.models.dinov2.modeling_dinov2:Dinov2Model": None},
           ("transformers.models.dinov2.modeling_dinov2:Dinov2Layer",),
           ("transformers.models.dinov2.modeling_dinov2:Dinov2Attention",), _BOTH,
           "class token; eager or sdpa attention"),
    Family("transformers Dinov2WithRegisters", "transformers-dinov2",
           {"transformers.models.dinov2_with_registers.modeling_dinov2_with_registers:"
            "Dinov2WithRegistersModel": None},
           ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers:"
            "Dinov2WithRegistersLayer",),
           ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers:"
            "Dinov2WithRegistersAttention",), _BOTH,
           "class + register tokens; eager or sdpa attention"),
    Family("transformers CLIP vision tower", "transformers-clip-vision",
           {"transformers.models.clip.modeling_clip:CLIPVisionModel": None,
            "transformers.models.clip.modeling_clip:CLIPVisionModelWithProjection":
                "vision_model"},
           ("transformers.models.clip.modeling_clip:CLIPEncoderLayer",),
           ("transformers.models.clip.modeling_clip:CLIPAttention",), _TOKEN,
           "class token; eager or sdpa attention"),
    Family("fisheradaptune demo TinyViT", "timm",
           {"fisheradaptune.demo.models:TinyViT": None},
           ("fisheradaptune.demo.models:_Block",), ("fisheradaptune.demo.models:_Attention",),
           _BOTH, "class token"),
]


def _resolve(ref: ClassRef) -> Optional[type]:
    if isinstance(ref, type):
        return ref
    module, _, qualname = ref.partition(":")
    obj = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def families() -> Tuple[Family, ...]:
    """The registered families, in the order they are matched."""
    return tuple(_FAMILIES)


def register_family(family: Family) -> Family:
    """Adds ``family`` to the allow-list (e.g. a copy of a supported library's classes under
    other names, such as the test suite's stand-ins). Its classes must have exactly the layout
    it names: registering vouches for that. A model class already registered is refused."""
    if not isinstance(family, Family):
        raise TypeError("fisheradaptune.vit.register_family: argument 'family': expected a "
                        f"fisheradaptune.vit.Family, got {type(family).__name__}")
    taken = {_key(ref) for f in _FAMILIES for ref in f.models}
    clash = [ref for ref in family.models if _key(ref) in taken]
    if clash:
        raise ValueError("fisheradaptune.vit.register_family: argument 'family': model class(es) "
                         f"{[_key(r) for r in clash]} already registered")
    _FAMILIES.append(family)
    return family


def _key(ref: ClassRef) -> str:
    return _name(ref).replace(f".{ref.__qualname__}", f":{ref.__qualname__}") \
        if isinstance(ref, type) else ref


def supported(api: str) -> str:
    """The families serving ``api``, for messages."""
    return "; ".join(f"{f.name} ({', '.join(_key(m).rpartition(':')[2] for m in f.models)})"
                     for f in _FAMILIES if api in f.methods)


class Match(NamedTuple):
    """A model matched to its family: the encoder holding the blocks, the blocks, the layout and
    the prefix tokens."""

    family: Family
    layout: Layout
    encoder: nn.Module
    blocks: List[nn.Module]
    prefix: Prefix


def match(model: nn.Module, api: str) -> Match:
    """The family of ``model`` for ``api``, or the refusal (TypeError for a class that is not
    registered for ``api``, ValueError for a registered class in a configuration that is not)."""
    cls = type(model)
    family, attr = None, None
    for f in _FAMILIES:
        for ref, a in f.models.items():
            if _resolve(ref) is cls:
                family, attr = f, a
                break
        if family is not None:
            break
    if family is None or api not in family.methods:
        what = f"{cls.__qualname__} ({cls.__module__})"
        if family is not None:
            what += f", family {family.name}, which supports only {sorted(family.methods)}"
        else:
            what += " is not a registered ViT family"
        raise refusal(api, "model", f"{what}. {api} supports exactly these classes: "
                      f"{supported(api)} (see fisheradaptune.vit.families())", TypeError)
    layout = LAYOUTS[family.layout]
    enc = model if attr is None else getattr(model, attr)
    blocks = layout.blocks(enc)
    if not blocks:
        raise refusal(api, "model", f"{cls.__qualname__} has no blocks")
    allowed_blocks = {_resolve(r) for r in family.blocks} - {None}
    allowed_attn = {_resolve(r) for r in family.attentions} - {None}
    for i, b in enumerate(blocks):
        if type(b) not in allowed_blocks:
            raise refusal(api, "model", f"block {i} of {cls.__qualname__} is a "
                          f"{_name(type(b))}; family {family.name} has blocks "
                          f"{[_key(r) for r in family.blocks]}")
        a = layout.attention(b)
        if type(a) not in allowed_attn:
            raise refusal(api, "model", f"block {i} of {cls.__qualname__} has attention "
                          f"{_name(type(a))}; family {family.name} has "
                          f"{[_key(r) for r in family.attentions]}")
    layout.check(enc, api)
    return Match(family, layout, enc, blocks, layout.prefix(enc))
