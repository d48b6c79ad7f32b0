"""Channel spaces and axis expressions: the algebra behind the dependency groups.

A *space* is a set of n abstract channels that are pruned together: every tensor axis that
carries them must lose the same ones. Spaces live in a union-find (coupling, e.g. through a
residual Add) and can be *refined* when an op looks inside them: a Split cuts a space into a
concatenation of sub-spaces, a Reshape into attention heads factors it into a product
(heads x head_dim). A leaf space that is not frozen is a prunable *group*.

Every axis of every tensor is described by an expression over spaces:

    Sp(id)          the channels of one space, in order
    Fx(n)           n positions that are never pruned (batch, spatial, frozen layouts)
    Cat(items)      concatenation (Concat offsets)
    Prod(items)     row-major product (Flatten of C x H x W, heads x head_dim)
    Free            an initializer axis not yet tied to anything (a mutable cell)

Ops that cannot be expressed this way raise `Unsupported`; callers then freeze what they touch,
which is always safe: a frozen space is simply kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np


class Unsupported(Exception):
    """A layout the algebra cannot express; the caller freezes the channels involved."""


@dataclass(frozen=True)
class Sp:
    sid: int


@dataclass(frozen=True)
class Fx:
    n: int
    origin: str = field(default="", compare=False)  # e.g. "graph input 'past'", for freeze reasons


@dataclass(frozen=True)
class Cat:
    items: tuple


@dataclass(frozen=True)
class Prod:
    items: tuple


class Free:
    """An initializer axis; `bound` is set once an op ties it to an expression."""

    __slots__ = ("n", "bound")

    def __init__(self, n: int):
        self.n = n
        self.bound = None

    def __repr__(self):
        return f"Free({self.n}->{self.bound!r})"


class _Space:
    __slots__ = ("size", "parent", "kind", "children", "frozen", "origin", "weak")

    def __init__(self, size, origin, weak=False):
        self.size = size
        self.parent = None
        self.kind = None  # None | "cat" | "prod"
        self.children = ()
        self.frozen = None  # reason string once frozen
        self.origin = origin
        self.weak = weak  # a copy's axis (Expand, ConstantOfShape): channels it meets name the class


class SpaceTable:
    """Union-find over spaces, with refinement into Cat/Prod of child spaces."""

    def __init__(self):
        self.spaces: list[_Space] = []

    # -- construction --------------------------------------------------------------------
    def new(self, size: int, origin: str, weak: bool = False):
        """A fresh space of `size` channels; one channel is never prunable, so it is Fx(1)."""
        if size <= 1:
            return Fx(size)
        self.spaces.append(_Space(size, origin, weak))
        return Sp(len(self.spaces) - 1)

    def find(self, sid: int) -> int:
        root = sid
        while self.spaces[root].parent is not None:
            root = self.spaces[root].parent
        while self.spaces[sid].parent is not None:  # path compression
            nxt = self.spaces[sid].parent
            self.spaces[sid].parent = root
            sid = nxt
        return root

    def _refine(self, root: int, kind: str, sizes) -> tuple:
        sp = self.spaces[root]
        children = []
        for i, n in enumerate(sizes):
            child = self.new(n, f"{sp.origin}/{kind}{i}")
            if isinstance(child, Sp) and sp.frozen:
                self.spaces[child.sid].frozen = sp.frozen
            children.append(child)
        sp.kind, sp.children = kind, tuple(children)
        return sp.children

    def _union(self, a: int, b: int):
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra > rb:  # the older space names the class
            ra, rb = rb, ra
        A, B = self.spaces[ra], self.spaces[rb]
        if A.weak and not B.weak:
            A.origin, A.weak = B.origin, False
        a_ref = (A.kind, A.children)
        b_ref = (B.kind, B.children)
        B.parent = ra
        reason = A.frozen or B.frozen
        if reason:
            self._freeze_root(ra, reason)
        if a_ref[0] is None and b_ref[0] is not None:
            A.kind, A.children = b_ref
            if reason:
                self._freeze_root(ra, reason)
        elif a_ref[0] is not None and b_ref[0] is not None:
            # both refined: their refinements must agree channel by channel
            self.unify(_struct(a_ref), _struct(b_ref))

    # -- freezing ---------------------------------------------------------------------------
    def _freeze_root(self, root: int, reason: str):
        sp = self.spaces[root]
        if not sp.frozen:
            sp.frozen = reason
        for c in sp.children:
            if isinstance(c, Sp):
                r = self.find(c.sid)
                if not self.spaces[r].frozen:
                    self._freeze_root(r, reason)

    def freeze(self, e, reason: str):
        """Freeze every space in expression `e` (an unbound Free becomes fixed)."""
        e = self.norm(e)
        if isinstance(e, Sp):
            self._freeze_root(e.sid, reason)
        elif isinstance(e, (Cat, Prod)):
            for it in e.items:
                self.freeze(it, reason)
        elif isinstance(e, Free):
            e.bound = Fx(e.n)

    # -- normal form ------------------------------------------------------------------------
    def size(self, e) -> int:
        if isinstance(e, Sp):
            return self.spaces[e.sid].size
        if isinstance(e, Fx):
            return e.n
        if isinstance(e, Free):
            return e.n
        if isinstance(e, Cat):
            return sum(self.size(i) for i in e.items)
        return prod(self.size(i) for i in e.items)

    def norm(self, e):
        """Resolve unions, refinements and bindings; flatten and simplify."""
        if isinstance(e, Free):
            return self.norm(e.bound) if e.bound is not None else e
        if isinstance(e, Sp):
            r = self.find(e.sid)
            sp = self.spaces[r]
            if sp.kind is None:
                return Sp(r)
            return self.norm(Cat(sp.children) if sp.kind == "cat" else Prod(sp.children))
        if isinstance(e, Fx):
            return e
        if isinstance(e, Cat):
            items = []
            for it in (self.norm(i) for i in e.items):
                parts = it.items if isinstance(it, Cat) else (it,)
                for p in parts:
                    if self.size(p) == 0:
                        continue
                    if isinstance(p, Fx) and items and isinstance(items[-1], Fx):
                        items[-1] = Fx(items[-1].n + p.n)
                    else:
                        items.append(p)
            return items[0] if len(items) == 1 else Cat(tuple(items))
        # Prod
        items = []
        for it in (self.norm(i) for i in e.items):
            parts = it.items if isinstance(it, Prod) else (it,)
            for p in parts:
                if isinstance(p, Fx) and p.n == 1:
                    continue
                if isinstance(p, Fx) and items and isinstance(items[-1], Fx):
                    items[-1] = Fx(items[-1].n * p.n)
                else:
                    items.append(p)
        if not items:
            return Fx(1)
        if len(items) == 1:
            return items[0]
        if isinstance(items[0], Cat):  # (A|B) x R == (A x R) | (B x R), row-major
            rest = tuple(items[1:])
            return self.norm(Cat(tuple(Prod((a,) + rest) for a in items[0].items)))
        return Prod(tuple(items))

    def spaces_in(self, e) -> list[int]:
        """Leaf space roots appearing in `e` (frozen ones included)."""
        e = self.norm(e)
        if isinstance(e, Sp):
            return [e.sid]
        if isinstance(e, (Cat, Prod)):
            return [s for it in e.items for s in self.spaces_in(it)]
        return []

    def prunable_in(self, e) -> list[int]:
        return [s for s in self.spaces_in(e) if not self.spaces[s].frozen]

    # -- unification ------------------------------------------------------------------------
    def unify(self, a, b, why="coupled to channels that cannot be pruned"):
        """Make `a` and `b` the same channels, position by position; `why` explains a freeze."""
        a, b = self.norm(a), self.norm(b)
        if a == b:
            return
        if self.size(a) != self.size(b):
            raise Unsupported(f"size mismatch {self.size(a)} vs {self.size(b)}")
        if isinstance(a, Free) or isinstance(b, Free):
            free, other = (a, b) if isinstance(a, Free) else (b, a)
            free.bound = other
            return
        if isinstance(a, Fx) or isinstance(b, Fx):
            fixed, other = (a, b) if isinstance(a, Fx) else (b, a)
            self.freeze(other, f"{why}: {fixed.origin}" if fixed.origin else why)
            return
        if isinstance(a, Sp) and isinstance(b, Sp):
            self._union(a.sid, b.sid)
            return
        if isinstance(b, Sp):
            a, b = b, a
        if isinstance(a, Sp):  # refine a to b's structure, then match piece by piece
            kind = "cat" if isinstance(b, Cat) else "prod"
            children = self._refine(a.sid, kind, [self.size(i) for i in b.items])
            for c, it in zip(children, b.items):
                self.unify(c, it, why)
            return
        if isinstance(a, Cat) or isinstance(b, Cat):
            cuts = sorted(set(_bounds(self, a)) | set(_bounds(self, b)))
            for pa, pb in zip(self.cut(a, cuts), self.cut(b, cuts)):
                self.unify(pa, pb, why)
            return
        # Prod vs Prod: factor a to b's factor sizes
        parts = self.split(a, [self.size(i) for i in b.items])
        for pa, pb in zip(parts, b.items):
            self.unify(pa, pb, why)

    # -- cutting and factoring ---------------------------------------------------------------
    def cut(self, e, points) -> list:
        """Pieces of `e` between consecutive `points` (which include 0 and the size)."""
        e = self.norm(e)
        n = self.size(e)
        points = sorted(set(int(p) for p in points) | {0, n})
        sizes = [q - p for p, q in zip(points, points[1:])]
        if len(sizes) == 1:
            return [e]
        if isinstance(e, Fx):
            return [Fx(s) for s in sizes]
        if isinstance(e, Free):
            pieces = [Free(s) for s in sizes]
            e.bound = Cat(tuple(pieces))
            return pieces
        if isinstance(e, Sp):
            return list(self._refine(e.sid, "cat", sizes))
        if isinstance(e, Cat):
            sub, off = [], 0
            for it in e.items:
                m = self.size(it)
                inner = [p - off for p in points if off < p < off + m]
                sub.extend((self.cut(it, [0, *inner, m])))
                off += m
            out, acc, off, k = [], [], 0, 1
            for piece in sub:
                acc.append(piece)
                off += self.size(piece)
                if off == points[k]:
                    out.append(self.norm(Cat(tuple(acc))))
                    acc, k = [], k + 1
            return out
        # Prod (row-major: rows of the leading factor): whole rows keep the product; a cut inside
        # a row makes that row its own piece of the leading factor, and cuts the rest there
        head, rest = e.items[0], self.norm(Prod(tuple(e.items[1:])))
        r = self.size(rest)
        if not any(p % r for p in points):
            return [self.norm(Prod((h, rest))) for h in self.cut(head, [p // r for p in points])]
        rows = sorted({p // r for p in points} | {-(-p // r) for p in points})
        atoms = []  # (start, expression) in row-major order
        for h, a, b in zip(self.cut(head, rows), rows, rows[1:]):
            inner = [p - a * r for p in points if a * r < p < b * r]
            if not inner:
                atoms.append((a * r, Prod((h, rest))))
                continue
            if b - a != 1:
                raise Unsupported("cut inside a row of a product layout")
            offsets = [0, *inner, r]
            atoms.extend((a * r + o, Prod((h, piece))) for o, piece in zip(offsets, self.cut(rest, offsets)))
        out = []
        for p, q in zip(points, points[1:]):
            out.append(self.norm(Cat(tuple(x for start, x in atoms if p <= start < q))))
        return out

    def split(self, e, sizes) -> list:
        """Factor `e` into row-major axes of the given sizes (a Reshape that splits an axis)."""
        e = self.norm(e)
        if prod(sizes) != self.size(e):
            raise Unsupported("split sizes do not match")
        big = [i for i, s in enumerate(sizes) if s != 1]
        out = [Fx(1)] * len(sizes)
        if len(big) <= 1:
            for i in big:
                out[i] = e
            return out
        parts = self._split_nontrivial(e, [sizes[i] for i in big])
        for i, p in zip(big, parts):
            out[i] = p
        return out

    def _split_nontrivial(self, e, sizes) -> list:
        if isinstance(e, Fx):
            return [Fx(s) for s in sizes]
        if isinstance(e, Free):
            pieces = [Free(s) for s in sizes]
            e.bound = Prod(tuple(pieces))
            return pieces
        if isinstance(e, Sp):
            return list(self._refine(e.sid, "prod", sizes))
        if isinstance(e, Cat):
            # rows are slices of the concatenation: all rows must drop the same columns
            inner = prod(sizes[1:])
            rows = self.cut(e, range(0, self.size(e) + 1, inner))
            for r in rows[1:]:
                self.unify(rows[0], r)
            return [Fx(sizes[0])] + self.split(rows[0], sizes[1:])
        # Prod: walk factors and target sizes together, factoring a factor when needed
        factors = list(e.items)
        out = []
        for t in sizes:
            acc, need = [], t
            while need > 1:
                f = factors.pop(0)
                fs = self.size(f)
                if need % fs == 0:
                    acc.append(f)
                    need //= fs
                elif fs % need == 0:
                    first, second = self.split(f, [need, fs // need])
                    acc.append(first)
                    factors.insert(0, second)
                    need = 1
                else:
                    raise Unsupported("reshape does not align with the channel layout")
            out.append(self.norm(Prod(tuple(acc))))
        return out

    # -- evaluation against a plan -----------------------------------------------------------
    def coords(self, e) -> list[tuple[int, np.ndarray]]:
        """For each prunable space in `e`: (space, channel index at each position or -1)."""
        e = self.norm(e)
        n = self.size(e)
        if isinstance(e, Sp):
            return [] if self.spaces[e.sid].frozen else [(e.sid, np.arange(n))]
        if isinstance(e, Cat):
            out, off = [], 0
            for it in e.items:
                m = self.size(it)
                for g, c in self.coords(it):
                    full = np.full(n, -1, dtype=np.int64)
                    full[off:off + m] = c
                    out.append((g, full))
                off += m
            return out
        if isinstance(e, Prod):
            out = [(None, None)]
            outer = 1
            sizes = [self.size(i) for i in e.items]
            for k, it in enumerate(e.items):
                inner = prod(sizes[k + 1:])
                for g, c in self.coords(it):
                    out.append((g, np.tile(np.repeat(c, inner), outer)))
                outer *= sizes[k]
            return out[1:]
        return []

    def keep_mask(self, e, keep: dict) -> np.ndarray:
        """Boolean mask over the positions of `e` that a plan keeps (`keep`: space -> bool[])."""
        return kept_positions(self.coords(e), keep, self.size(e))


def kept_positions(coords, keep: dict, n: int) -> np.ndarray:
    """Boolean mask over n positions with these `coords` (SpaceTable.coords) that a plan keeps;
    for callers that resolve an expression's coords once and apply many plans to them."""
    mask = np.ones(n, dtype=bool)
    for g, c in coords:
        k = keep.get(g)
        if k is not None:
            mask &= np.where(c >= 0, k[np.maximum(c, 0)], True)
    return mask


def _bounds(table: SpaceTable, e) -> list[int]:
    """Internal boundaries of a concatenation (0 and size included)."""
    pts, off = [0], 0
    for it in e.items if isinstance(e, Cat) else (e,):
        off += table.size(it)
        pts.append(off)
    return pts


def _struct(ref):
    kind, children = ref
    return Cat(children) if kind == "cat" else Prod(children)
