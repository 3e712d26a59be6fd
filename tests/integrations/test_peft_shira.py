"""Fisher-selected SHiRA masks (fisheradaptune.integrations.peft.shira_mask_fn).

The mask itself (exact count, row balance, top-Fisher entries against per-sample gradients
from plain autograd, refusals) is checked on a plain torch model, in every stage. Everything
peft does with it (get_peft_model, the transformers Trainer, save_pretrained /
PeftModel.from_pretrained, merge_and_unload, several adapters) runs on tiny config-built BERT
and Llama models where transformers, peft and accelerate are installed (the integration
stage); those tests skip elsewhere.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from fisheradaptune.integrations.peft import row_balanced_mask, shira_mask_fn


# ------------------------------------------------------------------ the mask, plain torch

class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _mlp_data(n_batches=3, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(n_batches)]


def _ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _mlp():
    torch.manual_seed(0)
    return _MLP()


def _autograd_fisher(model, batches, names, loss_fn=None):
    """(1/N) sum_n g_n**2 of each named Linear weight, one sample at a time (plain autograd,
    float64): independent of the hooks and ops.per_sample_grad_sq_."""
    loss_fn = loss_fn or _ce
    model = copy.deepcopy(model).double()
    mods = dict(model.named_modules())
    weights = [mods[n].weight for n in names]
    acc = [torch.zeros_like(w) for w in weights]
    count = 0
    for batch in batches:
        for i in range(len(batch[0])):
            one = tuple(t[i:i + 1].double() if t.is_floating_point() else t[i:i + 1]
                        for t in batch)
            for a, g in zip(acc, torch.autograd.grad(loss_fn(model, one), weights)):
                a += g * g
            count += 1
    return {n: a / count for n, a in zip(names, acc)}


def _check_row_balanced_top(mask, ref, count, tol):
    """``mask`` has exactly ``count`` ones, ``count // out`` or one more per row, each row's
    ones on its top entries of ``ref`` and the extra ones on the rows whose next entry has the
    most ``ref`` (up to ``tol``, for float32 against float64 rounding)."""
    out_f, in_f = mask.shape
    per_row, extra = divmod(count, out_f)
    sel = mask.bool()
    assert int(sel.sum()) == count
    rows = sel.sum(1)
    assert set(rows.tolist()) <= {per_row, per_row + 1}
    assert int((rows == per_row + 1).sum()) == extra
    for i in range(out_f):
        if 0 < rows[i] < in_f:
            assert ref[i][sel[i]].min() >= ref[i][~sel[i]].max() - tol, i
    if extra:
        nxt = torch.sort(ref, dim=1, descending=True).values[:, per_row]
        more = rows == per_row + 1
        assert nxt[more].min() >= nxt[~more].max() - tol


def test_mask_is_exact_row_balanced_and_top_fisher_against_plain_autograd():
    model = _mlp()
    data = _mlp_data()
    fn = shira_mask_fn(model, data, _ce)
    assert fn.names == ["fc1", "fc2", "head"] and fn.estimator == "per_sample"
    ref = _autograd_fisher(model, data, fn.names)
    for name in fn.names:
        torch.testing.assert_close(fn.fisher(name).double(), ref[name], rtol=1e-4, atol=1e-9)
    mods = dict(model.named_modules())
    # fc1 [10, 12]: r=1 -> 22 entries = 2 per row + 2 extra; r=3 -> 66 = 6 per row + 6 extra.
    # fc2 [7, 10]: r=2 -> 34 = 4 per row + 6 extra. head [3, 7]: r=2 -> 20 of 21.
    for name, r in (("fc1", 1), ("fc1", 3), ("fc2", 2), ("head", 2), ("fc2", 4)):
        w = mods[name].weight
        mask = fn(mods[name], r, bias=True)  # peft passes keyword arguments; accepted
        assert mask.shape == w.shape and mask.dtype == w.dtype and mask.device == w.device
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        _check_row_balanced_top(mask, ref[name], r * sum(w.shape), tol=1e-6 * float(ref[name].max()))


def test_calibration_leaves_the_model_as_it_was():
    model = _mlp()
    model.fc2.weight.requires_grad_(False)
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fn = shira_mask_fn(model, _mlp_data(), _ce)
    assert not model.fc2.weight.requires_grad and fn.fisher("fc2").any()  # estimated anyway
    assert torch.equal(model.fc1.weight.grad, torch.ones_like(model.fc1.weight))
    assert model.fc2.weight.grad is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_mask_dtype_follows_the_weight_and_other_estimators_work():
    model = _mlp()
    for est in ("empirical", "kfac"):
        fn = shira_mask_fn(model, _mlp_data(), _ce, estimator=est, modules=["fc1"])
        assert fn.names == ["fc1"] and fn.estimator == est
        mask = fn(model.fc1, 2)
        assert int(mask.sum()) == 44
    half = copy.deepcopy(model)
    fn = shira_mask_fn(half, _mlp_data(), _ce, modules=["fc2"])
    half.fc2.to(torch.bfloat16)  # same module object and Parameter, now bf16
    mask = fn(half.fc2, 1)
    assert mask.dtype == torch.bfloat16 and int(mask.float().sum()) == 17


def test_row_balanced_mask_spreads_the_remainder_and_breaks_ties_low():
    f = torch.tensor([[5.0, 4.0, 1.0], [3.0, 9.0, 2.0], [1.0, 1.0, 1.0]])
    # 5 entries over 3 rows: 1 per row (the largest), then the 2 rows with the largest second
    # entry: row 0 (4.0) and row 1 (3.0); row 2's tie picks its first column.
    expect = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert torch.equal(row_balanced_mask(f, 5), expect)
    assert torch.equal(row_balanced_mask(f, 9), torch.ones(3, 3, dtype=torch.bool))
    assert not row_balanced_mask(f, 0).any()
    with pytest.raises(ValueError, match=r"argument 'count': expected an integer in \[0, 9\]"):
        row_balanced_mask(f, 10)


def test_refusals_name_what_is_wrong():
    model = _mlp()
    data = _mlp_data()
    with pytest.raises(ValueError, match=r"argument 'estimator': expected one of .*'per_sample'"):
        shira_mask_fn(model, data, _ce, estimator="diag")
    with pytest.raises(ValueError, match=r"argument 'modules': the model has no module 'fc9'"):
        shira_mask_fn(model, data, _ce, modules=["fc9"])
    with pytest.raises(ValueError, match=r"argument 'modules': '' is a _MLP, expected a "
                                         r"torch.nn.Linear"):
        shira_mask_fn(model, data, _ce, modules=[""])
    with pytest.raises(ValueError, match=r"argument 'modules': contains duplicates"):
        shira_mask_fn(model, data, _ce, modules=["fc1", "fc1"])
    with pytest.raises(ValueError, match=r"argument 'loss_fn': expected a callable"):
        shira_mask_fn(model, data, None)
    with pytest.raises(ValueError, match=r"argument 'model': expected a torch.nn.Module"):
        shira_mask_fn("model", data, _ce)
    with pytest.raises(ValueError, match=r"argument 'batches': the Fisher is zero for every layer"):
        shira_mask_fn(model, [], _ce)
    fn = shira_mask_fn(model, data, _ce, modules=["fc1", "fc2"])
    # a layer it has no Fisher for: named, never a random fallback
    with pytest.raises(ValueError, match=r"argument 'base_layer': no Fisher for Linear\(in_features=7, "
                                         r"out_features=3.*not one of the calibrated.*'fc1', 'fc2'"):
        fn(model.head, 1)
    with pytest.raises(ValueError, match=r"no Fisher for Linear\(in_features=12"):
        fn(copy.deepcopy(model).fc1, 1)  # a copy of the model is another model
    with pytest.raises(ValueError, match=r"argument 'r': r \* \(in \+ out\) = 6 \* \(12 \+ 10\) = "
                                         r"132 entries exceed the 120 of 'fc1'.*largest r for it is 5"):
        fn(model.fc1, 6)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"argument 'r': expected an integer >= 1"):
            fn(model.fc1, bad)
    with pytest.raises(ValueError, match=r"argument 'base_layer': expected a torch.nn.Linear"):
        fn(nn.Conv1d(2, 2, 1), 1)
    # a calibrated layer that got no gradient
    fn = shira_mask_fn(model, data, lambda m, b: nn.functional.cross_entropy(
        m.head(torch.tanh(m.fc2(torch.tanh(m.fc1(b[0]))).detach())), b[1]))
    with pytest.raises(ValueError, match=r"the Fisher of 'fc1' is zero everywhere"):
        fn(model.fc1, 1)
    assert int(fn(model.head, 1).sum()) == 10


def test_the_mask_function_survives_deepcopy_and_does_not_keep_the_model_alive():
    import gc
    import weakref
    model = _mlp()
    fn = shira_mask_fn(model, _mlp_data(), _ce)
    assert copy.deepcopy(fn) is fn  # peft deep-copies configurations
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_importing_the_integration_imports_no_peft():
    code = ("import sys, fisheradaptune; "
            "assert 'fisheradaptune.integrations' not in sys.modules; "
            "import fisheradaptune.integrations.peft; "
            "assert 'peft' not in sys.modules, 'peft imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ peft on transformers

@pytest.fixture
def hf():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return transformers, peft


def _bert(transformers, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def _llama(transformers, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tokens(seed, n=6, seq=8, vocab=50, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g), torch.randint(0, classes, (n,), generator=g)


def _bert_loss(model, batch):
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


def _llama_loss(model, batch):
    ids, _ = batch
    return model(input_ids=ids, labels=ids).loss


def _config(peft, fn, r, targets, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft: "mask_type='fisher' is not recognized"
        config = peft.ShiraConfig(r=r, target_modules=targets, mask_type="fisher", **kw)
    config.mask_fn = fn
    return config


def _shira_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "shira_indices")}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train_a_little(model, loss_fn, steps=3, seed=100):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for s in range(steps):
        loss_fn(model, _tokens(seed + s, vocab=50)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_get_peft_model_takes_the_fisher_masks(hf, family):
    transformers, peft = hf
    build, loss_fn, targets = ((_bert, _bert_loss, ["query", "value"]) if family == "bert" else
                               (_llama, _llama_loss, ["q_proj", "v_proj", "down_proj"]))
    model = build(transformers)
    calib = [_tokens(0), _tokens(1)]
    fn = shira_mask_fn(model, calib, loss_fn)
    named = dict(model.named_modules())
    expected = {n: fn(named[n], 2) for n in fn.names if n.split(".")[-1] in targets}
    # the Fisher (tokens summed per sample) and the masks against plain autograd
    ref = _autograd_fisher(model, calib, list(expected), loss_fn)
    for name, mask in expected.items():
        torch.testing.assert_close(fn.fisher(name).double(), ref[name], rtol=1e-4, atol=1e-12)
        _check_row_balanced_top(mask, ref[name], 2 * sum(mask.shape),
                                tol=1e-5 * float(ref[name].max()))
    pm = peft.get_peft_model(model, _config(peft, fn, 2, targets))
    layers = _shira_layers(pm)
    assert len(layers) == len(expected) == (4 if family == "bert" else 6)
    for name, layer in layers.items():
        plain = name.removeprefix("base_model.model.")
        idx = layer.shira_indices["default"].long()
        mask = torch.zeros_like(expected[plain], dtype=torch.bool)
        mask[idx[0], idx[1]] = True
        assert torch.equal(mask, expected[plain].bool()), name
        w = layer.base_layer.weight
        assert layer.shira_weight["default"].numel() == 2 * sum(w.shape)
    # the Fisher masks differ from peft's random ones
    rand = peft.get_peft_model(build(transformers), peft.ShiraConfig(r=2, target_modules=targets))
    a = next(iter(_shira_layers(rand).values())).shira_indices["default"]
    b = next(iter(layers.values())).shira_indices["default"]
    assert not torch.equal(a, b)


def test_trainer_trains_only_the_masked_entries(hf, tmp_path):
    transformers, peft = hf
    pytest.importorskip("accelerate")

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            self.ids, self.labels = _tokens(5, n=16)

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    model = _bert(transformers)
    fn = shira_mask_fn(model, [_tokens(0), _tokens(1)], _bert_loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = peft.get_peft_model(model, _config(peft, fn, 2, ["query", "value"],
                                            modules_to_save=["classifier"]))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    transformers.Trainer(model=pm, args=args, train_dataset=Data()).train()
    for name, p in model.named_parameters():  # the base weights never move
        key = name.replace(".base_layer", "")
        if key in before and "shira" not in name and "modules_to_save" not in name:
            assert torch.equal(p.detach(), before[key]), name
    for name, layer in _shira_layers(pm).items():
        delta = layer.get_delta_weight("default").to_dense()
        mask = fn(layer.base_layer, 2).bool()
        assert delta[mask].any() and not delta[~mask].any(), name


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_save_load_merge_and_several_adapters(hf, tmp_path, family):
    transformers, peft = hf
    build, loss_fn, targets = ((_bert, _bert_loss, ["query", "value"]) if family == "bert" else
                               (_llama, _llama_loss, ["q_proj", "v_proj"]))
    model = build(transformers)
    fn = shira_mask_fn(model, [_tokens(0), _tokens(1)], loss_fn)
    pm = peft.get_peft_model(model, _config(peft, fn, 2, targets))
    _train_a_little(pm, loss_fn)
    ids = _tokens(50)[0]
    base_out = _logits(build(transformers), ids)
    out = _logits(pm, ids)
    assert not torch.allclose(out, base_out)  # the adapter changed the model
    # several adapters: a second one at another r, from the same mask function
    pm.add_adapter("second", _config(peft, fn, 1, targets))
    pm.set_adapter("second")
    _train_a_little(pm, loss_fn, seed=200)
    for name, layer in _shira_layers(pm).items():
        for adapter, r in (("default", 2), ("second", 1)):
            idx = layer.shira_indices[adapter].long()
            mask = torch.zeros(layer.out_features, layer.in_features, dtype=torch.bool)
            mask[idx[0], idx[1]] = True
            assert torch.equal(mask, fn(layer.base_layer, r).bool()), (name, adapter)
    out2 = _logits(pm, ids)
    pm.set_adapter("default")
    torch.testing.assert_close(_logits(pm, ids), out, rtol=0, atol=0)
    # save_pretrained / from_pretrained: identical outputs, without calling the mask function
    pm.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(build(transformers), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "second"), adapter_name="second")
    torch.testing.assert_close(_logits(loaded, ids), out, rtol=0, atol=0)
    loaded.set_adapter("second")
    torch.testing.assert_close(_logits(loaded, ids), out2, rtol=0, atol=0)
    # merge_and_unload: a plain model with equal outputs
    loaded.set_adapter("default")
    merged = loaded.merge_and_unload()
    assert not _shira_layers(merged)
    torch.testing.assert_close(_logits(merged, ids), out, rtol=1e-5, atol=1e-5)


def test_a_peft_model_is_refused_and_later_adapters_work(hf):
    transformers, peft = hf
    model = _bert(transformers)
    fn = shira_mask_fn(model, [_tokens(0)], _bert_loss)
    pm = peft.get_peft_model(model, _config(peft, fn, 1, ["query"]))
    with pytest.raises(ValueError, match=r"argument 'model': PeftModel\w* is a peft model.*"
                                         r"before peft.get_peft_model"):
        shira_mask_fn(pm, [_tokens(0)], _bert_loss)
    # the mask function made before get_peft_model serves a later adapter on other layers
    pm.add_adapter("v_adapter", _config(peft, fn, 1, ["value"]))
    assert any("v_adapter" in layer.shira_indices for layer in _shira_layers(pm).values())
    # layers left out of calibration are refused by name when peft asks for them
    plain = _bert(transformers)
    only_first = shira_mask_fn(plain, [_tokens(0)], _bert_loss,
                               modules=["bert.encoder.layer.0.attention.self.query"])
    with pytest.raises(ValueError, match=r"no Fisher for Linear\(in_features=32, out_features=32"
                                         r".*Calibrated layers: "
                                         r"'bert.encoder.layer.0.attention.self.query'\."):
        peft.get_peft_model(plain, _config(peft, only_first, 1, ["query"]))
    with pytest.raises(ValueError, match=r"argument 'r': r \* \(in \+ out\) = 17 \* \(32 \+ 32\) = "
                                         r"1088 entries exceed the 1024"):
        other = _bert(transformers)
        peft.get_peft_model(other, _config(peft, shira_mask_fn(other, [_tokens(0)], _bert_loss),
                                           17, ["query"]))
