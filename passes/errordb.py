"""Error database: what each channel group loses at each width, measured on calibration data.

SPDY (METHODS.md section 1) adapted to channels. For every group, channels are ranked by what
they contribute to the outputs of the layers that read them; for every width, the error is the
normalised output error of those layers after the kept channels' weights are refitted by least
squares on the dense model's activations (the structured form of AdaPrune):

    E_g(k) = sum over consumer layers L of  min_W' ||X W - X_K W'||^2 / ||X W||^2

where X is L's dense input and K its features from the other groups plus g's top-k channels.
All widths of a group come from one Cholesky factorisation of L's Gram matrix X'X with the
features in keep order: the energy a least-squares fit explains with the first j features is
the squared norm of the first j rows of chol(X'X)^-1 X'X W. Groups no weight layer reads (the
head dimension of attention logits) fall back to their share of their producers' output energy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.linalg import cho_factor, cho_solve, solve_triangular
from scipy.linalg.blas import get_blas_funcs

from onnx_prune.backends.ort import session_with_outputs
from onnx_prune.passes.reconstruct import (feed_batches, from_weight_matrix, layer_rows, refittable_layers,
                                           weight_matrix)

MAX_ROWS = 4096  # rows of X per layer over all calibration batches
FLUSH_ROWS = 2048
RIDGE = 0.3  # relative diagonal load: Gram matrices are often singular, and with little calibration
# data a refit should stay near what the network learnt


def ridge_load(gram: np.ndarray) -> float:
    """The diagonal load of a refit: RIDGE times the Gram matrix's mean diagonal, above zero where
    the layer's kept inputs are all zero on the calibration data (its weights then stay as they are)."""
    return max(RIDGE * float(np.trace(gram)) / len(gram), 1e-30)


@dataclass
class _Layer:
    node: onnx.NodeProto
    per_pos: int  # features per input channel position (kh*kw for a conv, else 1)
    coords: list  # [(space id, channel at each input position or -1)]
    axes: tuple = ()  # (input channel expr, output channel expr)
    gram: np.ndarray = None
    rows: int = 0
    pending: list = field(default_factory=list, repr=False)
    # fold -> its samples' share of gram, for every fold but the last: that one is gram minus the
    # others (a Gram matrix fewer to hold: ResNet-50's take ~0.3 GB each)
    fold_grams: dict = field(default_factory=dict, repr=False)
    fold: int | None = None  # the fold the pending rows come from
    last_fold: int | None = None  # the fold whose share is not held

    def add(self, X, fold=None):
        """Buffer rows; the Gram matrix is updated in large blocks (one matmul, in place), not per
        calibration batch: with batch-1 models that is hundreds of n x n updates otherwise."""
        if fold != self.fold:
            self.flush()
            self.fold = fold
        self.pending.append(X)
        self.rows += len(X)
        if sum(len(x) for x in self.pending) >= FLUSH_ROWS:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        X = np.concatenate(self.pending)
        self.pending = []
        g = X.T @ X  # float32 throughout: the ridge load keeps every solve well conditioned
        if self.fold is not None and self.fold != self.last_fold:
            part = self.fold_grams.get(self.fold)
            self.fold_grams[self.fold] = g.copy() if part is None else part + g
        if self.gram is None:
            self.gram = g
        else:
            self.gram += g

    def gram_without(self, fold: int, feats: np.ndarray) -> np.ndarray:
        """Rows `feats` of the Gram matrix of every fold's samples but `fold`'s."""
        if fold in self.fold_grams:
            return self.gram[feats] - self.fold_grams[fold][feats]
        return sum(part[feats] for part in self.fold_grams.values())


@dataclass
class ErrorDB:
    """Per group: channel order (most important first) and error at each kept count 0..size."""

    order: dict[str, np.ndarray] = field(default_factory=dict)
    curve: dict[str, np.ndarray] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # "refit" | "energy"
    layers: list = field(default_factory=list, repr=False)  # with their Gram matrices, for stitch()
    rows_per_batch: int = 0  # rows each calibration batch gave every layer (at most)
    absorbed: int = 0  # samples added by absorb(): the curves and folds no longer describe the Grams

    def error(self, group: str, width: int) -> float:
        return float(self.curve[group][width])

    def stitch(self, pruned: onnx.ModelProto, analysis, plan, without: int | None = None) -> onnx.ModelProto:
        """SPDY's stitching: `pruned` (the plan applied) with every layer whose input lost channels
        refitted by ridge least squares on the *dense* activations' Gram matrix, towards its pruned
        weights -- cheap enough to score search candidates, and compile's layer-wise recovery.
        `without`: refit on every fold's samples but that one's (the database built with folds)."""
        if without is not None and self.absorbed:
            raise ValueError("the database absorbed samples outside its folds: no fold-wise refit")
        keep = analysis.keep_arrays(plan)
        out = onnx.ModelProto()
        out.CopyFrom(pruned)
        inits = {t.name: t for t in out.graph.initializer}
        for lay in self.layers:
            in_mask = analysis.table.keep_mask(lay.axes[0], keep)
            if in_mask.all():
                continue
            out_mask = analysis.table.keep_mask(lay.axes[1], keep)
            feats = _feature_index(np.flatnonzero(in_mask), lay.per_pos)
            rows = lay.gram[feats] if without is None else lay.gram_without(without, feats)
            gram = rows[:, feats]
            lam = ridge_load(gram)
            dense = _dense_weights(analysis, lay.node)[:, out_mask]
            rhs = (rows @ dense) + lam * dense[feats]
            gram[np.diag_indices_from(gram)] += lam
            W = cho_solve(cho_factor(gram, lower=True, check_finite=False), rhs, check_finite=False)
            tensor = inits[lay.node.input[1]]
            own_type = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)  # float16 models stay float16
            tensor.CopyFrom(numpy_helper.from_array(
                from_weight_matrix(lay.node, W, tuple(tensor.dims)).astype(own_type), tensor.name))
        return out

    def short_of_rows(self) -> bool:
        """Whether most layers got fewer rows than the database reads (MAX_ROWS): their refits are
        then short of data, and every further sample adds to them. MiniLM's 51 fitting sentences
        give each layer ~1,000 token rows (its FFN reads 1,536 features); ResNet-50's 205 images
        fill every conv's 4,096 patches, and only its classifier gets fewer (one row an image)."""
        return 2 * sum(lay.rows < MAX_ROWS for lay in self.layers) > len(self.layers)

    def absorb(self, model: onnx.ModelProto, samples: dict) -> None:
        """Add more samples' rows to every Gram matrix, as many per batch as the database took, so
        that stitch() refits on them too. Once the search is over: the curves stay those measured."""
        feeds_list = feed_batches(model, samples)
        wanted = list(dict.fromkeys(lay.node.input[0] for lay in self.layers))
        sess = session_with_outputs(model, wanted, optimize=True)
        rng = np.random.default_rng(1)
        for feeds in feeds_list:
            values = dict(zip(wanted, sess.run(wanted, feeds)))
            for lay in self.layers:
                lay.add(layer_rows(lay.node, values[lay.node.input[0]], self.rows_per_batch, rng, feeds))
        for lay in self.layers:
            lay.flush()
        self.absorbed += len(next(iter(samples.values())))

    def scores(self) -> dict[str, np.ndarray]:
        """Scores for `keep_top`: the top-k by score are the first k of the order."""
        out = {}
        for g, order in self.order.items():
            s = np.empty(len(order))
            s[order] = np.arange(len(order), 0, -1, dtype=float)
            out[g] = s
        return out


def build_error_db(model: onnx.ModelProto, analysis, samples: dict, log=lambda msg: None,
                   folds: list | None = None, channel_energy: dict | None = None) -> ErrorDB:
    """Measure the error database of `model` (canonical, dense) on calibration `samples`. With
    `folds` (boolean masks over the samples), each fold's share of every Gram matrix is kept too,
    so that `stitch(..., without=k)` refits on the other folds alone. `channel_energy` (group name
    -> per channel) replaces the producers' output energy of groups no layer reads: for rotated
    query/key dimensions, the logits' variance each carries (passes/rotate.py)."""
    by_sid = {g.sid: g for g in analysis.groups}
    layers = _consumer_layers(analysis, by_sid, last_fold=len(folds) - 1 if folds else None)
    energy_groups = [g for g in analysis.groups if not any(g.sid == sid for lay in layers for sid, _ in lay.coords)]
    given = channel_energy or {}
    energy_values = _producer_outputs(analysis, [g for g in energy_groups if g.name not in given])
    parts = [{k: v[mask] for k, v in samples.items()} for mask in folds] if folds else [samples]
    feeds_list = [(f if folds else None, feeds) for f, part in enumerate(parts) for feeds in feed_batches(model, part)]
    rows = max(-(-MAX_ROWS // len(feeds_list)), 8)  # spread over every batch: more images, not more rows
    wanted = list(dict.fromkeys([lay.node.input[0] for lay in layers] + [v for v, _ in energy_values]))
    sess = session_with_outputs(model, wanted, optimize=True)
    rng = np.random.default_rng(0)
    energy = {g.sid: np.array(given[g.name], dtype=np.float64) if g.name in given else np.zeros(g.size)
              for g in energy_groups}
    for fold, feeds in feeds_list:
        values = dict(zip(wanted, sess.run(wanted, feeds)))
        for lay in layers:
            lay.add(layer_rows(lay.node, values[lay.node.input[0]], rows, rng, feeds), fold)
        for name, coords in energy_values:
            _add_energy(energy, values[name], coords)
    for lay in layers:
        lay.flush()
    log(f"error database: {len(layers)} layers, {len(feeds_list)} calibration batches")
    db = ErrorDB(layers=layers, rows_per_batch=rows)
    ranking = _rank(analysis, layers, energy)
    for g in analysis.groups:
        db.order[g.name] = ranking[g.sid]
        db.curve[g.name] = np.zeros(g.size + 1)
    for lay in layers:
        W = _dense_weights(analysis, lay.node)
        for sid, coord in lay.coords:
            g = by_sid[sid]
            refit, dropped = _layer_curves(lay, W, coord, ranking[sid], g.size)
            db.curve[g.name] += _blend(refit, dropped, lay)
            db.source[g.name] = "refit"
    for g in energy_groups:
        e = energy[g.sid][ranking[g.sid]]
        total = max(e.sum(), 1e-30)
        db.curve[g.name] = np.concatenate([[e.sum()], e.sum() - np.cumsum(e)]) / total
        db.source[g.name] = "energy"
    for g in analysis.groups:
        db.curve[g.name] = np.maximum(db.curve[g.name] - db.curve[g.name][-1], 0.0)  # dense costs nothing
    return db


def _consumer_layers(analysis, by_sid, last_fold=None) -> list[_Layer]:
    ctx, table = analysis.ctx, analysis.table
    out = []
    for node, axes in refittable_layers(analysis):
        coords = [(sid, c) for sid, c in table.coords(axes[0]) if sid in by_sid]
        if not coords:
            continue
        per_pos = int(np.prod(ctx.index.shape(node.input[1])[2:])) if node.op_type == "Conv" else 1
        out.append(_Layer(node, per_pos, coords, tuple(axes), last_fold=last_fold))
    return out


def _dense_weights(analysis, node) -> np.ndarray:
    """A weight layer's dense weights as (features, outputs), float32. Read when used, not held: the
    database lives through the whole compile, and a copy of every weight is the model's size again."""
    return weight_matrix(node, analysis.ctx.index.const(node.input[1]).astype(np.float32))


def _producer_outputs(analysis, groups) -> list:
    """(value, [(axis, sid, coord)]) of producer outputs carrying the given groups."""
    ctx, table = analysis.ctx, analysis.table
    wanted = {g.sid for g in groups}
    nodes = {n.name: n for n in ctx.index.model.graph.node}
    out = []
    for g in groups:
        for prod in g.producers:
            value = nodes[prod].output[0]
            coords = [(k, sid, c) for k, e in enumerate(ctx.ax(value) or [])
                      for sid, c in table.coords(e) if sid in wanted]
            if coords:
                out.append((value, coords))
    return list({v: (v, c) for v, c in out}.values())


def _add_energy(energy, x, coords):
    x = np.asarray(x, dtype=np.float64) ** 2
    for axis, sid, c in coords:
        per_pos = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).sum(1)
        sel = c >= 0
        np.add.at(energy[sid], c[sel], per_pos[sel])


def _feature_index(positions, per_pos):
    return (np.asarray(positions)[:, None] * per_pos + np.arange(per_pos)[None]).reshape(-1)


def _rank(analysis, layers, energy) -> dict[int, np.ndarray]:
    """Channels of every group, most important first: each channel's share of the output energy
    of the layers reading it (diagonal of the Gram matrix times the weight rows' norms), or of
    its producers' outputs for groups no layer reads."""
    score = {g.sid: np.zeros(g.size) for g in analysis.groups}
    for lay in layers:
        contrib = np.diag(lay.gram) * (_dense_weights(analysis, lay.node) ** 2).sum(1)
        per_position = contrib.reshape(-1, lay.per_pos).sum(1) / max(contrib.sum(), 1e-30)
        for sid, c in lay.coords:
            sel = c >= 0
            np.add.at(score[sid], c[sel], per_position[sel])
    for sid, e in energy.items():
        score[sid] += e / max(e.sum(), 1e-30)
    # highest score first; ties by channel index so the order is deterministic
    return {sid: np.lexsort((np.arange(len(s)), -s)) for sid, s in score.items()}


def _layer_curves(lay: _Layer, W: np.ndarray, coord: np.ndarray, order: np.ndarray, size: int):
    """Normalised output errors of `lay` (dense weights `W`, (features, outputs)) keeping the other groups' features and the first k
    channels of this group in `order`, for k = 0..size: with the kept weights refitted by ridge
    least squares, and with the dropped channels simply removed."""
    rank = np.empty(size, dtype=np.int64)
    rank[order] = np.arange(size)
    positions = np.arange(len(coord))
    other = positions[coord < 0]
    mine = positions[coord >= 0]
    mine = mine[np.argsort(rank[coord[mine]], kind="stable")]
    perm = np.concatenate([_feature_index(other, lay.per_pos), _feature_index(mine, lay.per_pos)])
    gram = np.take(np.take(lay.gram, perm, 0), perm, 1)  # = gram[np.ix_(perm, perm)], in half the time
    weights = W[perm]
    target = gram @ weights  # X'Y with Y = X W, the dense layer's output, in keep order
    base = float(np.sum(weights * target, dtype=np.float64))
    if base <= 0:
        return np.zeros(size + 1), np.zeros(size + 1)
    gram_loaded = gram.copy()
    gram_loaded[np.diag_indices_from(gram)] += ridge_load(gram)
    # the transpose (the same symmetric matrix) is in Fortran order: LAPACK factors it in place
    chol, _ = cho_factor(gram_loaded.T, lower=True, overwrite_a=True, check_finite=False)
    explained = np.cumsum((solve_triangular(chol, target, lower=True, check_finite=False) ** 2).sum(1),
                          dtype=np.float64)
    # feature count once the first k channels are in (a channel may sit at several positions)
    per_channel = np.bincount(coord[mine], minlength=size)[order] * lay.per_pos
    ends = len(other) * lay.per_pos + np.concatenate([[0], np.cumsum(per_channel)])
    refit = np.maximum(base - np.where(ends > 0, explained[np.maximum(ends - 1, 0)], 0.0), 0.0) / base
    # without refit: the energy of the dropped features' contribution, for every start j the
    # trailing block's sum_{a,b>=j} G_ab w_a.w_b = sum_{a>=j} (2 w_a.u_a - G_aa |w_a|^2) with
    # u_a = sum_{b>=a} G_ab w_b, i.e. U = triu(G) W: one triangular product (trmm reads the upper
    # triangle of G' in Fortran order, which is G's)
    upper_product = get_blas_funcs("trmm", (gram, weights))(1.0, gram.T, np.asfortranarray(weights), lower=0)
    per_feature = 2 * np.einsum("ij,ij->i", weights, upper_product) - np.diag(gram) * np.einsum("ij,ij->i", weights, weights)
    tail = np.cumsum(per_feature[::-1], dtype=np.float64)[::-1]
    dropped = np.append(tail, 0.0)[np.minimum(ends, len(perm))] / base
    return refit, np.maximum(dropped, 0.0)


def _blend(refit, dropped, lay: _Layer):
    """In-sample refit errors are optimistic in proportion to features per calibration row
    (MiniLM's FFN: 1,536 features, ~1,250 tokens); errors without refit are pessimistic. On
    MiniLM their geometric mean tracked the refit's held-out error within about 10%."""
    alpha = min(0.5, len(lay.gram) / max(lay.rows, 1))
    return refit ** (1 - alpha) * dropped ** alpha
