"""peft's SHiRA with Fisher-selected masks (fisheradaptune.integrations.peft.shira_mask_fn).

A small BERT classifier built from a config (no weights downloaded) gets SHiRA adapters on its
attention query/value layers twice, with peft's random mask and with Fisher masks at the same
r (the same trainable count), and reports how much of each layer's Fisher each mask covers and
how much the two masks overlap; then it trains the Fisher-masked model a few steps, saves and
reloads the adapter and merges it (outputs equal). Which mask trains better is the MiniLM
demo's question (docs/methods.md section 10). Needs transformers and peft; runs in seconds on
a CPU:

    python examples/shira_fisher_peft.py
"""
from __future__ import annotations

import tempfile
import warnings

import torch
import transformers
import peft

from fisheradaptune.integrations.peft import shira_mask_fn

R, STEPS, TARGETS = 2, 10, ["query", "value"]


def build():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def data(seed, n=32, seq=12):
    """Label = whether the last token is below 50: the classifier reads the first position, so
    attention (where the adapters are) must carry it there."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, seq), generator=g)
    return ids, (ids[:, -1] < 50).long()


def loss_fn(model, batch):
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


def train(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(STEPS):
        loss_fn(model, data(100 + step)).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def masks_of(model):
    return {name.removeprefix("base_model.model."): layer.shira_indices["default"]
            for name, layer in model.named_modules() if hasattr(layer, "shira_indices")}


def main():
    # Random mask: peft's own (seeded).
    random_model = peft.get_peft_model(build(), peft.ShiraConfig(r=R, target_modules=TARGETS,
                                                                 modules_to_save=["classifier"],
                                                                 random_seed=0))
    # Fisher masks: calibrate the plain model once, then hand peft the mask function.
    base = build()
    fn = shira_mask_fn(base, [data(s) for s in range(4)], loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft: mask_type "fisher" is not its own
        config = peft.ShiraConfig(r=R, target_modules=TARGETS, modules_to_save=["classifier"],
                                  mask_type="fisher")
    config.mask_fn = fn
    fisher_model = peft.get_peft_model(base, config)
    fisher_model.print_trainable_parameters()

    rand, fish = masks_of(random_model), masks_of(fisher_model)
    for name in fish:
        f = fn.fisher(name)
        covered = [float(f[i[0].long(), i[1].long()].sum() / f.sum()) for i in (rand[name], fish[name])]
        same = len(set(map(tuple, rand[name].T.tolist())) & set(map(tuple, fish[name].T.tolist())))
        print(f"{name}: {fish[name].shape[1]} entries; Fisher covered random {100 * covered[0]:.1f}% "
              f"vs Fisher mask {100 * covered[1]:.1f}%; {same} entries in both")
    # Everything after the mask is plain peft: train, save, reload, merge.
    ids = data(999)[0]
    train(fisher_model)
    with torch.no_grad():
        out = fisher_model(input_ids=ids).logits
        with tempfile.TemporaryDirectory() as tmp:
            fisher_model.save_pretrained(tmp)
            loaded = peft.PeftModel.from_pretrained(build().eval(), tmp)
        same = torch.equal(loaded(input_ids=ids).logits, out)
        merged = loaded.merge_and_unload()
        diff = float((merged(input_ids=ids).logits - out).abs().max())
    print(f"reloaded adapter: outputs identical {same}; merged: max difference {diff:.1e}")


if __name__ == "__main__":
    main()
