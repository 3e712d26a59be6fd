"""TR-PTS sparse insertion: token reduction after the blocks with the fewest selected params."""
import types

import pytest
import torch

import fisheradaptune as fat
from fisheradaptune.demo.models import TinyViT
from fisheradaptune.selection import select_from_fisher


def selection_for(model, heavy_blocks):
    """A selection index with 8 connections per row in `heavy_blocks`, 1 elsewhere."""
    index = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n.startswith("blocks."):
            c = 8 if int(n.split(".")[1]) in heavy_blocks else 1
            index[n] = torch.arange(c).expand(m.out_features, c).clone()
    return types.SimpleNamespace(index=index)  # what sparse_layers reads of a Selection


def test_selection_from_fisher_works_too():
    model = TinyViT(depth=4)
    fisher = {n: torch.rand(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}
    index, _ = select_from_fisher(fisher, budget=0.05, c_min=1)
    assert len(fat.vit.sparse_layers(model, types.SimpleNamespace(index=index), count=2)) == 2


def per_block_counts(model, sel):
    counts = [0] * len(model.blocks)
    for name, idx in sel.index.items():
        counts[int(name.split(".")[1])] += idx.numel()
    return counts


def test_sparse_layers_picks_the_blocks_with_fewest_selected_parameters():
    torch.manual_seed(0)
    model = TinyViT(depth=6)
    sel = selection_for(model, heavy_blocks={0, 2, 3})
    counts = per_block_counts(model, sel)
    got = fat.vit.sparse_layers(model, sel, count=2)
    candidates = sorted(range(5), key=lambda i: (counts[i], i))  # never the last block
    assert got == tuple(sorted(candidates[:2]))
    assert not set(got) & {0, 2, 3}


def test_prune_merge_sparse_layers_patches_those_blocks():
    torch.manual_seed(0)
    model = TinyViT(depth=6)
    sel = selection_for(model, heavy_blocks={1, 4})
    x = torch.randn(2, 1, 16, 16)
    handle = fat.vit.prune_merge(model, keep=0.5, layers="sparse", selection=sel, sparse_count=3)
    assert handle.layers == fat.vit.sparse_layers(model, sel, 3)
    assert not set(handle.layers) & {1, 4}
    assert model(x).shape == (2, 10)
    handle.remove()


def test_sparse_layers_errors():
    model = TinyViT(depth=4)
    sel = selection_for(model, heavy_blocks={0})
    with pytest.raises(ValueError, match="selection"):
        fat.vit.prune_merge(model, layers="sparse")
    with pytest.raises(ValueError, match="layers"):
        fat.vit.prune_merge(model, layers="dense")
    with pytest.raises(ValueError, match="count"):
        fat.vit.sparse_layers(model, sel, count=4)
    with pytest.raises(TypeError, match="selection"):
        fat.vit.sparse_layers(model, {"blocks.0.mlp.fc1": torch.zeros(1, 1)}, count=1)


def test_record_kept_patches_follows_tokens_through_reductions():
    torch.manual_seed(0)
    model = TinyViT(depth=4).eval()
    x = torch.randn(3, 1, 16, 16)
    handle = fat.vit.prune_merge(model, keep=0.5, layers=(1,))
    assert fat.vit.handle_of(model) is handle
    handle.record = True
    with torch.no_grad():
        # The scores the hook uses after block 1: the CLS row of block 1 on its input.
        feats = model.patch_embed(x)
        feats = torch.cat([model.cls_token.expand(3, -1, -1), feats], 1) + model.pos_embed
        block_in = model.blocks[0](feats)
        row = fat.vit.cls_attention(model, model.blocks[1], block_in)[:, 1:]
        model(x)
    kept = handle.kept_patches
    assert kept.shape == (3, 8 + 1) and bool((kept[:, -1] == -1).all())
    expected = torch.sort(torch.topk(row, 8, dim=1).indices, dim=1).values
    assert torch.equal(kept[:, :8], expected)
    # A second reduction keeps a subset of the survivors (or the fused token, -1).
    handle.remove()
    handle = fat.vit.prune_merge(model, keep=0.5, layers=(1, 2))
    handle.record = True
    with torch.no_grad():
        model(x)
    second = handle.kept_patches
    assert second.shape == (3, 5 + 1)
    for b in range(3):
        assert set(second[b].tolist()) <= set(kept[b].tolist())
    handle.remove()
    assert fat.vit.handle_of(model) is None
