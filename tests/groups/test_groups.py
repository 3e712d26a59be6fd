"""GroupLayout and its builders (docs/methods.md section 2): per_tensor, slabs, per_module, build."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from helpers import group_index, requires_cuda, shape_lists
from fisheradaptune import groups
from fisheradaptune.groups import GroupLayout


def named(*shapes, prefix="p"):
    return [(f"{prefix}{i}", torch.zeros(s)) for i, s in enumerate(shapes)]


def rows_of(layout, group):
    """(tensor_index, first_row, end_row) of each segment of ``group`` (2-D tensors)."""
    out = []
    for t, b, e in layout.segments_of(group):
        cols = layout.shapes[t].numel() // layout.shapes[t][0]
        assert b % cols == 0 and e % cols == 0, "slab does not cover whole rows"
        out.append((t, b // cols, e // cols))
    return out


def assert_exact_cover(layout):
    """Every element of every tensor is in exactly one group."""
    for idx in group_index(layout):  # raises on overlap
        assert bool((idx >= 0).all()), "an element is in no group"


# ---------------------------------------------------------------------------------------------
# per_tensor


def test_per_tensor_one_group_per_tensor():
    params = named((3, 4), (5,), (), (2, 2, 2))
    layout = groups.per_tensor(params)
    assert layout.num_groups == 4 and layout.num_tensors == 4
    assert layout.names == ("p0", "p1", "p2", "p3")
    assert layout.tensor_names == ("p0", "p1", "p2", "p3")
    assert layout.segments.tolist() == [[0, 0, 12, 0], [1, 0, 5, 1], [2, 0, 1, 2], [3, 0, 8, 3]]
    assert layout.group_sizes.tolist() == [12, 5, 1, 8]
    assert layout.segments.dtype == torch.int64 and layout.segments.device.type == "cpu"
    assert_exact_cover(layout)


def test_per_tensor_skips_empty_tensors_but_keeps_their_index():
    params = named((0,), (3,), (0, 4))
    layout = groups.per_tensor(params)
    assert layout.num_tensors == 3            # the op still receives all three tensors
    assert layout.names == ("p1",)
    assert layout.segments.tolist() == [[1, 0, 3, 0]]


def test_per_tensor_on_module_uses_trainable_parameters_only():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[0].bias.requires_grad_(False)
    layout = groups.per_tensor(model)
    assert layout.tensor_names == ("0.weight", "1.weight", "1.bias")
    assert layout.names == ("0.weight", "1.weight", "1.bias")


def test_named_params_must_be_pairs():
    with pytest.raises(TypeError, match=r"named_params\[1\]"):
        groups.per_tensor([("a", torch.zeros(2)), torch.zeros(2)])
    with pytest.raises(TypeError, match=r"named_params\[0\]"):
        groups.slabs([("a", [1, 2])])


# ---------------------------------------------------------------------------------------------
# slabs


def test_slabs_default_k4_rows_of_a_linear_weight():
    layout = groups.slabs(named((10, 3)))
    assert layout.names == ("p0.slab0", "p0.slab1", "p0.slab2", "p0.slab3")
    # 10 rows into 4: the first 10 % 4 = 2 slabs get one extra row.
    assert [rows_of(layout, g) for g in range(4)] == [[(0, 0, 3)], [(0, 3, 6)], [(0, 6, 8)],
                                                      [(0, 8, 10)]]
    assert layout.group_sizes.tolist() == [9, 9, 6, 6]
    assert_exact_cover(layout)


def test_slabs_vectors_and_conv_channels():
    params = [("bias", torch.zeros(9)), ("conv.weight", torch.zeros(8, 3, 2, 2))]
    layout = groups.slabs(params, k=4)
    assert layout.group_sizes.tolist() == [3, 2, 2, 2, 24, 24, 24, 24]
    assert layout.segments[4:].tolist() == [[1, 0, 24, 4], [1, 24, 48, 5], [1, 48, 72, 6],
                                            [1, 72, 96, 7]]


@given(rows=st.integers(1, 60), cols=st.integers(1, 5), k=st.integers(1, 9))
def test_slabs_are_near_equal_contiguous_and_in_order(rows, cols, k):
    layout = groups.slabs([("w", torch.zeros(rows, cols))], k=k)
    n = min(k, rows)
    assert layout.num_groups == n
    slab_rows = [rows_of(layout, g) for g in range(n)]
    assert all(len(s) == 1 for s in slab_rows)
    spans = [s[0] for s in slab_rows]
    # contiguous, in order, covering every row
    assert spans[0][1] == 0 and spans[-1][2] == rows
    assert all(a[2] == b[1] for a, b in zip(spans, spans[1:]))
    sizes = [e - b for _, b, e in spans]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)    # the longer slabs come first
    if n == 1:
        assert layout.names == ("w",)
    else:
        assert layout.names == tuple(f"w.slab{j}" for j in range(n))
    assert_exact_cover(layout)


def test_slabs_fewer_rows_than_k_gives_one_slab_per_row():
    layout = groups.slabs(named((3, 5), (1, 7), (2,)), k=4)
    assert layout.names == ("p0.slab0", "p0.slab1", "p0.slab2", "p1", "p2.slab0", "p2.slab1")
    assert layout.group_sizes.tolist() == [5, 5, 5, 7, 1, 1]
    assert_exact_cover(layout)


def test_slabs_zero_dim_tensor_is_one_group():
    layout = groups.slabs([("temperature", torch.tensor(1.5)), ("w", torch.zeros(4, 2))])
    assert layout.names[0] == "temperature"
    assert layout.segments[0].tolist() == [0, 0, 1, 0]
    assert layout.num_groups == 5


def test_slabs_empty_tensors_form_no_group():
    layout = groups.slabs(named((0,), (0, 3), (3, 0), (4,)), k=2)
    assert layout.num_tensors == 4
    assert layout.names == ("p3.slab0", "p3.slab1")
    assert layout.segments.tolist() == [[3, 0, 2, 0], [3, 2, 4, 1]]


@pytest.mark.parametrize("name", ["blocks.0.attn.qkv.weight", "encoder.layers.3.self_attn.in_proj_weight"])
def test_slabs_split_fused_qkv_into_12_groups(name):
    dim = 8
    layout = groups.slabs([(name, torch.zeros(3 * dim, 5))])
    assert layout.num_groups == 12
    expected = tuple(f"{name}.{part}.slab{j}" for part in "qkv" for j in range(4))
    assert layout.names == expected
    assert layout.names[1] == f"{name}.q.slab1"
    # q is rows [0, 8), k [8, 16), v [16, 24); each split into 4 slabs of 2 rows
    spans = [rows_of(layout, g)[0] for g in range(12)]
    assert spans == [(0, r, r + 2) for r in range(0, 24, 2)]
    assert_exact_cover(layout)


def test_slabs_qkv_bias_is_split_too():
    layout = groups.slabs([("blocks.1.attn.qkv.bias", torch.zeros(12))], k=2)
    assert layout.names == tuple(f"blocks.1.attn.qkv.bias.{p}.slab{j}" for p in "qkv" for j in range(2))
    assert layout.group_sizes.tolist() == [2] * 6


def test_slabs_qkv_with_fewer_rows_per_part_than_k():
    layout = groups.slabs([("attn.qkv.weight", torch.zeros(6, 4))], k=4)
    assert layout.names == ("attn.qkv.weight.q.slab0", "attn.qkv.weight.q.slab1",
                            "attn.qkv.weight.k.slab0", "attn.qkv.weight.k.slab1",
                            "attn.qkv.weight.v.slab0", "attn.qkv.weight.v.slab1")
    assert layout.group_sizes.tolist() == [4] * 6


def test_slabs_qkv_not_split_when_disabled_or_not_divisible_or_not_qkv():
    base = groups.slabs([("blocks.0.attn.qkv.weight", torch.zeros(24, 5))], split_qkv=False)
    assert base.names == tuple(f"blocks.0.attn.qkv.weight.slab{j}" for j in range(4))
    odd = groups.slabs([("blocks.0.attn.qkv.weight", torch.zeros(10, 5))])
    assert odd.num_groups == 4 and all(".q." not in n for n in odd.names)
    other = groups.slabs([("blocks.0.mlp.fc1.weight", torch.zeros(24, 5))])
    assert other.num_groups == 4 and all(".q." not in n for n in other.names)


@pytest.mark.parametrize("k", [0, -1, 2.5, "4", None])
def test_slabs_rejects_bad_k(k):
    with pytest.raises(ValueError, match="'k'"):
        groups.slabs(named((4, 4)), k=k)


@given(shapes=shape_lists(max_len=25, allow_edge_sizes=False), k=st.integers(1, 6),
       qkv=st.booleans())
def test_builders_cover_each_element_exactly_once(shapes, k, qkv):
    params = [(("blk.attn.qkv.weight" if (qkv and i % 2) else f"t{i}"), torch.zeros(s))
              for i, s in enumerate(shapes)]
    for layout in (groups.per_tensor(params), groups.slabs(params, k=k)):
        assert layout.num_tensors == len(shapes)
        assert_exact_cover(layout)
        assert int(layout.group_sizes.sum()) == sum(torch.Size(s).numel() for s in shapes)
        assert bool((layout.group_sizes > 0).all())   # builders make no empty groups
        # names are unique when tensor names are
        if len({n for n, _ in params}) == len(params):
            assert len(set(layout.names)) == layout.num_groups


# ---------------------------------------------------------------------------------------------
# per_module


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))          # owned by the block itself
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(3, 2, bias=False)


def test_per_module_groups_span_the_tensors_of_one_module():
    model = Block()
    layout = groups.per_module(model)
    assert layout.tensor_names == ("scale", "fc.weight", "fc.bias", "norm.weight", "norm.bias",
                                   "head.weight")
    assert layout.names == ("<root>", "fc", "norm", "head")
    assert layout.segments_of(1) == [(1, 0, 12), (2, 0, 3)]      # fc: weight and bias
    assert layout.segments_of(2) == [(3, 0, 3), (4, 0, 3)]
    assert layout.group_sizes.tolist() == [3, 15, 6, 6]
    assert layout.groups_of(2) == [1]
    assert_exact_cover(layout)
    # segments are sorted by tensor then begin (the order the kernels plan in)
    rows = layout.segments.tolist()
    assert rows == sorted(rows)


def test_per_module_on_a_sequential_and_with_shared_parameters():
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(2, 1))   # lin appears twice
    layout = groups.per_module(model)
    assert layout.tensor_names == ("0.weight", "0.bias", "3.weight", "3.bias")
    assert layout.names == ("0", "3")
    assert_exact_cover(layout)


def test_per_module_rejects_non_module():
    with pytest.raises(TypeError, match="'model'"):
        groups.per_module([("a", torch.zeros(2))])


# ---------------------------------------------------------------------------------------------
# build


def test_build_every_spec_kind():
    model = Block()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    slabs = groups.build("slabs", params)
    assert slabs.names == groups.slabs(params).names
    assert torch.equal(slabs.segments, groups.slabs(params).segments)
    per_tensor = groups.build("per_tensor", params)
    assert per_tensor.names == tuple(n for n, _ in params)
    per_module = groups.build("per_module", params, model=model)
    assert per_module.names == ("<root>", "fc", "norm", "head")
    given_layout = groups.slabs(params, k=2)
    assert groups.build(given_layout, params) is given_layout
    seen = []

    def custom(named_params):
        seen.append([n for n, _ in named_params])
        return groups.per_tensor(named_params)

    assert groups.build(custom, iter(params)).num_groups == len(params)
    assert seen == [[n for n, _ in params]]


def test_build_errors():
    model = Block()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"'groups'.*needs the model"):
        groups.build("per_module", params)
    with pytest.raises(ValueError, match=r"'groups'.*exactly"):
        groups.build("per_module", params[1:], model=model)
    with pytest.raises(ValueError, match=r"'groups'.*exactly"):
        groups.build("per_module", params[::-1], model=model)
    with pytest.raises(TypeError, match=r"'groups'.*callable returned dict"):
        groups.build(lambda p: {}, params)
    with pytest.raises(ValueError, match=r"'groups'.*'per_parameter'"):
        groups.build("per_parameter", params)
    with pytest.raises(ValueError, match=r"'groups'"):
        groups.build(42, params)
    # a GroupLayout that does not match the tensors
    with pytest.raises(ValueError, match=r"'groups': expected 2 tensors .*got 6"):
        groups.build(groups.per_tensor(params[:2]), params)
    wrong = groups.per_tensor([(n, torch.zeros(7)) for n, _ in params])
    with pytest.raises(ValueError, match=r"'groups\[0\]': expected shape \(7,\)"):
        groups.build(wrong, params)


# ---------------------------------------------------------------------------------------------
# GroupLayout validation and accessors


def layout_of(rows, numels=(10, 5), num_groups=3):
    return GroupLayout(tuple(f"t{i}" for i in range(len(numels))),
                       tuple(torch.Size([n]) for n in numels),
                       tuple(f"g{j}" for j in range(num_groups)),
                       torch.tensor(rows, dtype=torch.int64).reshape(-1, 4))


def test_layout_accepts_gaps_adjacent_segments_and_empty_groups():
    layout = layout_of([[0, 0, 3, 0], [0, 3, 6, 1], [1, 4, 5, 0]])
    assert layout.group_sizes.tolist() == [4, 3, 0]
    assert layout.segments_of(0) == [(0, 0, 3), (1, 4, 5)]
    assert layout.segments_of(2) == []
    assert layout.groups_of(0) == [0, 1] and layout.groups_of(1) == [0]
    assert layout.numels == [10, 5]
    assert "3 groups over 2 tensors, 7 elements" in repr(layout)


def test_layout_normalises_segments_to_int64_cpu_rows():
    layout = GroupLayout(("a",), ((4,),), ("g",), torch.tensor([0, 0, 4, 0], dtype=torch.int32))
    assert layout.segments.dtype == torch.int64 and layout.segments.shape == (1, 4)
    assert layout.segments.is_contiguous()
    assert layout.shapes == (torch.Size([4]),)


@pytest.mark.parametrize("rows, match", [
    ([[2, 0, 1, 0]], r"row 0: tensor_index 2 out of range for 2 tensors"),
    ([[-1, 0, 1, 0]], r"tensor_index -1 out of range"),
    ([[0, 0, 11, 0]], r"row 0: range \[0, 11\) out of bounds for 't0' with 10 elements"),
    ([[0, 0, 1, 0], [1, -1, 2, 1]], r"row 1: range \[-1, 2\) out of bounds"),
    ([[0, 4, 3, 0]], r"range \[4, 3\) out of bounds"),
    ([[0, 0, 1, 3]], r"group_id 3 out of range for 3 groups"),
    ([[0, 0, 1, -1]], r"group_id -1 out of range"),
    ([[0, 0, 5, 0], [0, 4, 8, 1]], r"\[0, 5\) and \[4, 8\) of 't0' overlap"),
    ([[0, 2, 8, 0], [1, 0, 5, 1], [0, 0, 3, 2]], r"\[0, 3\) and \[2, 8\) of 't0' overlap"),
    ([[0, 0, 5, 0], [0, 0, 5, 0]], r"\[0, 5\) and \[0, 5\) of .t0. overlap"),
])
def test_layout_rejects_bad_segments(rows, match):
    with pytest.raises(ValueError, match=r"^GroupLayout: 'segments' (row \d+: )?" + match):
        layout_of(rows)


def test_layout_accepts_an_empty_segment_inside_another_like_the_kernels():
    segments = torch.tensor([[0, 0, 10, 0], [0, 2, 2, 1]])
    sums = torch.empty(2)
    torch.ops.fisheradaptune.fisher_accumulate_([torch.ones(10)], [None], 1.0, 1.0, segments, sums,
                                                torch.zeros((), dtype=torch.int64))
    assert sums.tolist() == [10.0, 0.0]                 # the kernels accept it
    layout = layout_of(segments.tolist(), numels=(10,), num_groups=2)
    assert layout.group_sizes.tolist() == [10, 0]


def test_layout_rejects_names_shapes_length_mismatch():
    with pytest.raises(ValueError, match=r"'tensor_names' has 2 entries but 'shapes' has 1"):
        GroupLayout(("a", "b"), ((3,),), ("g",), torch.zeros(0, 4, dtype=torch.int64))


def test_check_tensors_names_the_argument():
    layout = layout_of([[0, 0, 3, 0]])
    layout.check_tensors([torch.zeros(10), torch.zeros(5)])
    layout.check_tensors([torch.zeros(10), None])            # None entries are not checked
    with pytest.raises(ValueError, match=r"argument 'fisher': expected 2 tensors .* got 3"):
        layout.check_tensors([torch.zeros(10)] * 3, arg="fisher")
    with pytest.raises(ValueError, match=r"argument 'grads\[1\]': expected shape \(5,\) of 't1'"):
        layout.check_tensors([torch.zeros(10), torch.zeros(6)], arg="grads")


def test_segments_on_is_cached_per_device():
    layout = groups.slabs(named((8, 2), (3,)))
    assert layout.segments_on("cpu") is layout.segments
    assert layout.segments_on(torch.device("cpu")) is layout.segments
    meta = layout.segments_on("meta")
    assert meta.device.type == "meta" and meta.shape == layout.segments.shape
    assert meta.dtype == torch.int64
    assert layout.segments_on("meta") is meta
    assert layout.segments_on(torch.device("meta")) is meta
    assert list(layout._on_device) == [torch.device("meta")]


@pytest.mark.cuda
@requires_cuda
def test_segments_on_cuda_is_cached():
    layout = groups.slabs(named((8, 2), (3,)))
    on = layout.segments_on("cuda")
    assert on.is_cuda and torch.equal(on.cpu(), layout.segments)
    assert layout.segments_on("cuda") is on


# ---------------------------------------------------------------------------------------------
# name_aliases


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_name_aliases_for_tied_and_compiled_names():
    model = torch.compile(_Tied(), backend="eager")
    named_params = list(model.named_parameters())
    assert [n for n, _ in named_params] == ["_orig_mod.emb.weight"]
    layout = groups.slabs(named_params)
    aliases = groups.name_aliases(model, layout)
    assert aliases["emb.weight"] == "_orig_mod.emb.weight"
    assert aliases["head.weight"] == "_orig_mod.emb.weight"
    assert aliases["_orig_mod.head.weight"] == "_orig_mod.emb.weight"
    assert aliases["head.weight.slab3"] == "_orig_mod.emb.weight.slab3"
    assert "_orig_mod.emb.weight" not in aliases  # canonical names are not aliases


def test_name_aliases_leave_out_an_alias_of_two_names():
    model = nn.Module()
    model.a = nn.Linear(2, 2)
    model._orig_mod = nn.Module()
    model._orig_mod.a = nn.Linear(2, 2)  # "a.weight" would stand for both tensors
    layout = groups.per_tensor(model)
    aliases = groups.name_aliases(model, layout)
    assert "a.weight" not in aliases and "a.bias" not in aliases
