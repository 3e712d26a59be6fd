"""FisherAdapTune inside a transformers Trainer: trains, checkpoints, a resumed run ends where
the uninterrupted one does, and the Trainer's gradient clipping (max_grad_norm) counts the
trainable elements only. Runs in the integration stage (transformers installed)."""
from __future__ import annotations

import pytest
import torch

import fisheradaptune as fat

transformers = pytest.importorskip("transformers")
# The Trainer needs accelerate: the integration stage has it (through peft); the main stage
# has transformers for the MiniLM demo but not accelerate.
pytest.importorskip("accelerate")


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=8, vocab=50):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _model():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def _trainer(out, model, max_steps, save_steps, max_grad_norm=1.0, callbacks=None,
             policy=None):
    inner = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    opt = fat.FisherAdapTune(inner, model, check_every=2, policy=policy or fat.Threshold(
        tau=0.2, patience=1, min_active_fraction=0.3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
        save_steps=save_steps, save_strategy="steps", logging_strategy="no", report_to=[],
        use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        max_grad_norm=max_grad_norm)
    return transformers.Trainer(model=model, args=args, train_dataset=_Data(),
                                optimizers=(opt, sched), callbacks=callbacks), opt


def test_trainer_trains_checkpoints_and_resumes_to_the_same_result(tmp_path):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, opt = _trainer(tmp_path / "straight", model, max_steps=8, save_steps=100)
    trainer.train()
    assert opt.step_count == 8 and opt.frozen.any()  # the wrapper really ran and froze
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(before[n], straight[n]) for n in before)

    first = _model()
    trainer, _ = _trainer(tmp_path / "resumed", first, max_steps=8, save_steps=4)
    trainer.train()  # saves checkpoint-4 (and checkpoint-8)
    resumed = _model()
    trainer, opt2 = _trainer(tmp_path / "resumed", resumed, max_steps=8, save_steps=4)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    assert opt2.step_count == 8
    assert torch.equal(opt2.frozen, opt.frozen)
    for n, p in resumed.named_parameters():
        torch.testing.assert_close(p.detach(), straight[n], rtol=0, atol=0, msg=n)


class _SeeClippedGrads(transformers.TrainerCallback):
    """After the Trainer clipped the gradients, just before the optimizer step: the norm of
    the frozen and of the active gradient elements."""

    def __init__(self):
        self.opt = None
        self.seen = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        frozen = active = 0.0
        for p in model.parameters():
            if p.grad is None:
                continue
            mask = self.opt.frozen_mask(p)
            frozen += float(p.grad[mask].double().square().sum())
            active += float(p.grad[~mask].double().square().sum())
        self.seen.append((frozen ** 0.5, active ** 0.5))


def test_trainer_max_grad_norm_clips_by_the_trainable_elements_only(tmp_path):
    """The defect: the Trainer clipped with frozen slabs' gradients in the norm (1.87 against
    0.94 for the active elements in the report), scaling active updates by 0.54 instead of 1.
    Now frozen gradients are zero by the time it clips, so clipping to max_norm leaves the
    active gradients with norm max_norm."""
    model = _model()
    seen = _SeeClippedGrads()
    max_norm = 1e-3  # far below the gradient norm: every step clips
    trainer, opt = _trainer(tmp_path / "clip", model, max_steps=3, save_steps=100,
                            max_grad_norm=max_norm, callbacks=[seen], policy=fat.Observe())
    seen.opt = opt
    # Slabs with large gradients: the pooler's and the position embeddings'.
    opt.freeze([f"bert.{t}.weight.slab{j}" for j in (0, 1)
                for t in ("pooler.dense", "embeddings.position_embeddings")])
    trainer.train()
    assert opt.step_count == 3 and len(seen.seen) == 3
    for frozen, active in seen.seen:
        assert frozen == 0.0
        assert abs(active - max_norm) <= 1e-4 * max_norm  # scaled to max_norm exactly, not less
