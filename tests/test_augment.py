"""Spliced calibration sequences (global AdaPrune's extra contexts): each new sequence is a real
start joined to a real end, padded like the originals; anything but masked token inputs is left alone."""

import numpy as np

from onnx import TensorProto, helper, numpy_helper

from onnx_prune.passes import augment
from onnx_prune.passes.augment import spliced_sequences, token_table


def _tokens():
    ids = np.zeros((3, 8), np.int64)
    mask = np.zeros((3, 8), np.int64)
    for i, length in enumerate((4, 6, 8)):
        ids[i, :length] = [101] + [1000 * (i + 1) + j for j in range(1, length - 1)] + [102]
        mask[i, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_splices_join_a_start_to_an_end_and_keep_the_mask_true():
    samples = _tokens()
    out = spliced_sequences(samples, per_sample=20)
    assert {k: v.shape for k, v in out.items()} == {k: (63, 8) for k in samples}
    assert all(np.array_equal(out[k][:3], samples[k]) for k in samples)  # the originals come first
    for ids, mask in zip(out["input_ids"][3:], out["attention_mask"][3:]):
        length = int(mask.sum())
        assert np.array_equal(mask, np.arange(8) < length)  # padded on the right, like the originals
        assert ids[0] == 101 and ids[length - 1] == 102 and (ids[length:] == 0).all()
        inner = ids[1:length - 1]
        # a run from one sentence, then a run from another: no token out of its sentence's order
        source = inner // 1000
        assert (np.diff(source) != 0).sum() <= 1 and (np.diff(inner)[np.diff(source) == 0] == 1).all()
    assert len({tuple(r) for r in out["input_ids"][3:]}) > 20  # new contexts, not copies


def test_no_splices_for_inputs_that_are_not_masked_token_sequences():
    images = {"input": np.zeros((4, 3, 8, 8), np.float32)}
    assert spliced_sequences(images) is None
    left_padded = _tokens()
    left_padded["attention_mask"] = left_padded["attention_mask"][:, ::-1].copy()
    assert spliced_sequences(left_padded) is None
    with_positions = {**_tokens(), "position_ids": np.tile(np.arange(8), (3, 1))}
    assert spliced_sequences(with_positions) is None


def _table(vocabulary=4000, dim=6, seed=0):
    return np.random.default_rng(seed).standard_normal((vocabulary, dim)).astype(np.float32)


def test_neighbour_swaps_replace_inner_tokens_of_the_splices_by_near_ones():
    samples, table = _tokens(), _table()
    plain = spliced_sequences(samples, per_sample=40)
    out = spliced_sequences(samples, per_sample=40, embedding=("input_ids", table))
    assert all(np.array_equal(out[k][:3], samples[k]) for k in samples)  # the originals untouched
    assert np.array_equal(out["attention_mask"], plain["attention_mask"])  # the same splices
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    swapped = inner = 0
    for before, after, mask in zip(plain["input_ids"][3:], out["input_ids"][3:], out["attention_mask"][3:]):
        length = int(mask.sum())
        assert after[0] == before[0] and after[length - 1] == before[length - 1]  # [CLS], [SEP] kept
        assert (after[length:] == 0).all()
        for old, new in zip(before[1:length - 1], after[1:length - 1]):
            inner += 1
            if old != new:
                swapped += 1
                rank = int(np.sum(unit @ unit[old] > unit[new] @ unit[old] + 1e-5)) - 1  # itself ranks first
                assert rank < augment.NEIGHBOURS, rank
    assert abs(swapped / inner - augment.SWAP_RATE) < 0.08, swapped / inner


def test_token_table_is_the_large_table_the_ids_index():
    nodes = [helper.make_node("Gather", ["words", "input_ids"], ["w"]),
             helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
             helper.make_node("Add", ["w", "t"], ["y"])]
    inits = [numpy_helper.from_array(_table(), "words"), numpy_helper.from_array(_table(2), "types")]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", 8]) for n in ("input_ids", "token_type_ids")]
    g = helper.make_graph(nodes, "emb", ids, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g)
    name, table = token_table(model, _tokens())
    assert name == "input_ids" and table.shape == (4000, 6)
    assert token_table(model, {"token_type_ids": _tokens()["token_type_ids"]}) is None  # a table of 2 rows
