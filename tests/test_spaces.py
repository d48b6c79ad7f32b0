"""The channel-space algebra: unification, refinement, cutting, factoring and plan evaluation."""

import numpy as np
import pytest

from onnx_prune.passes.spaces import Cat, Free, Fx, Prod, Sp, SpaceTable, Unsupported


def keep(table, e, plan):
    return np.flatnonzero(table.keep_mask(e, {table.find(k.sid): v for k, v in plan.items()}))


def test_union_couples_channels():
    t = SpaceTable()
    a, b = t.new(4, "a"), t.new(4, "b")
    t.unify(a, b)
    assert t.norm(a) == t.norm(b)
    mask = np.array([True, False, True, False])
    assert list(keep(t, b, {a: mask})) == [0, 2]


def test_fixed_freezes_the_other_side():
    t = SpaceTable()
    a = t.new(4, "a")
    t.unify(a, Fx(4))
    assert t.spaces[t.find(a.sid)].frozen
    assert t.prunable_in(a) == []


def test_concat_against_space_refines_it():
    t = SpaceTable()
    a, b, c = t.new(2, "a"), t.new(3, "b"), t.new(5, "c")
    t.unify(Cat((a, b)), c)
    assert t.norm(c) == Cat((t.norm(a), t.norm(b)))
    plan = {a: np.array([True, False]), b: np.array([False, True, True])}
    assert list(keep(t, c, plan)) == [0, 3, 4]


def test_misaligned_concats_are_cut_to_common_boundaries():
    t = SpaceTable()
    a, b, c, d = t.new(2, "a"), t.new(4, "b"), t.new(4, "c"), t.new(2, "d")
    t.unify(Cat((a, b)), Cat((c, d)))  # boundaries 2 vs 4: b is cut at 2, c at 2
    mask_a = np.array([False, True])
    assert list(keep(t, c, {a: mask_a}))[:1] == [1]
    assert t.size(t.norm(b)) == 4 and isinstance(t.norm(b), Cat)


def test_split_factors_heads_and_head_dim():
    t = SpaceTable()
    hidden = t.new(12, "q")
    heads, dim = t.split(hidden, [3, 4])
    plan = {heads: np.array([True, False, True]), dim: np.array([True, True, False, False])}
    assert list(keep(t, hidden, plan)) == [0, 1, 8, 9]


def test_split_of_concat_couples_rows():
    """Channel shuffle: concat(A, B) viewed as (2, n) means column j of A and B go together."""
    t = SpaceTable()
    a, b = t.new(4, "a"), t.new(4, "b")
    rows, cols = t.split(Cat((a, b)), [2, 4])
    assert rows == Fx(2)
    assert t.find(t.norm(a).sid) == t.find(t.norm(b).sid)


def test_prod_realigns_by_factoring():
    """(C/g, g) reshaped to (g, C/g) works when g divides C/g: the first factor is refined."""
    t = SpaceTable()
    s, g = t.new(8, "s"), t.new(2, "g")
    parts = t.split(Prod((s, g)), [2, 8])
    assert [t.size(p) for p in parts] == [2, 8]


def test_prod_misaligned_raises():
    t = SpaceTable()
    s, g = t.new(3, "s"), t.new(2, "g")
    with pytest.raises(Unsupported):
        t.split(Prod((s, g)), [2, 3])


def test_flatten_product_with_fixed_spatial():
    t = SpaceTable()
    c = t.new(3, "c")
    flat = Prod((c, Fx(4)))
    assert list(keep(t, flat, {c: np.array([False, True, False])})) == [4, 5, 6, 7]


def test_cut_inside_a_product_row_gives_that_row_its_own_piece():
    """ShuffleNetV2 at 116 channels: after two shuffles a branch's channels are 29 rows x 4, and
    the next unit splits them at 58, inside row 14. That row becomes its own piece of the leading
    space (one row: kept whole, as a single-channel piece is), the other rows still prune; here 6
    rows x 2 cut at 7, inside row 3."""
    t = SpaceTable()
    c = t.new(6, "c")
    whole = Prod((c, Fx(2)))
    first, second = t.cut(whole, [0, 7, 12])
    assert (t.size(first), t.size(second)) == (7, 5)
    before, row, after = t.norm(c).items
    assert (t.size(before), row, t.size(after)) == (3, Fx(1), 2)
    drop_rows_0_and_4 = {before: np.array([False, True, True]), after: np.array([False, True])}
    assert list(keep(t, whole, drop_rows_0_and_4)) == [2, 3, 4, 5, 6, 7, 10, 11]
    assert list(keep(t, first, drop_rows_0_and_4)) == [2, 3, 4, 5, 6]
    assert list(keep(t, second, drop_rows_0_and_4)) == [0, 3, 4]


def test_free_binds_to_first_use_and_couples_later_uses():
    t = SpaceTable()
    a, b = t.new(4, "a"), t.new(4, "b")
    f = Free(4)
    t.unify(f, a)
    t.unify(f, b)
    assert t.find(t.norm(a).sid) == t.find(t.norm(b).sid)


def test_frozen_propagates_through_union_and_refinement():
    t = SpaceTable()
    a, b = t.new(4, "a"), t.new(4, "b")
    t.freeze(a, "reason x")
    t.unify(a, b)
    assert t.spaces[t.find(b.sid)].frozen == "reason x"
    c = t.new(6, "c")
    t.freeze(c, "y")
    pieces = t.cut(c, [0, 2, 6])
    assert all(t.spaces[p.sid].frozen for p in pieces)


def test_size_mismatch_is_unsupported():
    t = SpaceTable()
    with pytest.raises(Unsupported):
        t.unify(t.new(3, "a"), t.new(4, "b"))


def test_one_channel_spaces_are_fixed():
    assert SpaceTable().new(1, "x") == Fx(1)
    assert isinstance(SpaceTable().new(2, "x"), Sp)
