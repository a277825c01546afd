"""The codebook i-quants: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S, encoded exactly.

These types do not round each weight on its own. A super-block of 256 weights is cut into
*groups* of 8 weights (IQ2) or 4 (IQ3). A group is stored as the index of a vector of magnitudes
in a fixed codebook (ggml's grids, taken from gguf-py) plus the signs of its weights, and the
groups of a sub-block of 16 or 32 weights share a 4-bit scale times the super-block's fp16 ``d``:

    weight = scale(sub-block) * codebook[index(group)][j] * sign(j)

In IQ2_XXS, IQ2_XS and IQ3_XXS every 8 weights carry an even number of minus signs: 7 sign bits
are stored and the 8th is their parity. Where a weight's own signs are odd, the one that costs
least to get wrong (smallest importance * w^2) takes the other sign, and is fitted as a negative
magnitude (the codebook's smallest magnitudes then serve it best).

The split is the one of :mod:`edgequant.ggml_quants`: ``fit`` chooses the sub-block scales
(a :class:`CodebookGrid`), ``grid.round`` chooses each group's vector and signs (:class:`Codes`),
``grid.values`` decodes them as gguf-py does, bit for bit, and ``pack`` / ``unpack`` write and
read llama.cpp's bytes.

A group's codes are the codebook vector nearest it under the importance weights, found among all
of the codebook's vectors by one matrix product (:meth:`Codebook.nearest`). The scale search tries
8 scales per sub-block. For the codebooks of up to 512 vectors it searches them all too (the matrix
product is faster than any lookup); for the larger ones (IQ2_S's 1024, IQ1's 2048) it uses a
cheaper search: each weight's
nearest magnitude level gives the group a point of the level lattice, a table made once per type
lists the ``NEIGHBOURS`` codebook vectors closest to each point, and the weighted error chooses
among those (:meth:`Codebook.near_one`: the nearest of all for 98-99% of groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType

from .ggml_quants import F16, F32, TYPES, Grid, QuantType, _nearest_level, _u8

NEIGHBOURS = 16  # codebook vectors tried per group
EXACT_UP_TO = 512  # codebook size up to which the scale search scores every vector (faster than the table)
NEAREST_ELEMENTS = 1 << 21  # groups x codebook vectors scored at once (8 MB)
SCALE_TRIES = np.linspace(0.7, 1.4, 8, dtype=F32)  # sub-block scales tried: the largest magnitude onto
# this many times the top level, each then refitted by least squares (15 tries from 0.6 to 1.3 cost
# twice the time for the same error on heavy-tailed weights)


@dataclass(frozen=True)
class Codes:
    """The codes of a codebook type for a (rows, cols) tensor."""

    index: np.ndarray  # (rows, cols // group) codebook vector of each group
    signs: np.ndarray  # (rows, cols // 8) uint8: bit j set = weight j of the 8 is negative


class Codebook:
    """One type's codebook vectors and the lattice table of their nearest vectors."""

    def __init__(self, gguf_type: type):
        gguf_type.init_grid()
        self.vectors = gguf_type.grid.reshape(gguf_type.grid_shape).astype(F32)  # (K, group)
        self.group = self.vectors.shape[1]
        self.levels = np.array(gguf_type.grid_map, F32)

    @cached_property
    def near(self) -> np.ndarray:
        """(lattice points, NEIGHBOURS): the codebook vectors nearest each lattice point, nearest first."""
        n_levels = len(self.levels)
        keys = np.arange(n_levels**self.group)
        digits = keys[:, None] // self.place[None, :] % n_levels
        lattice = self.levels[digits]
        d2 = (lattice**2).sum(1)[:, None] - 2 * lattice @ self.vectors.T + self.squares.sum(1)[None, :]
        return np.argsort(d2, axis=1, kind="stable")[:, :NEIGHBOURS].astype(np.int32)

    @cached_property
    def near_stacked(self) -> np.ndarray:
        """(lattice points, NEIGHBOURS, 2 group): each neighbour's squares, then the vector itself."""
        return np.concatenate([self.squares, self.vectors], 1)[self.near]

    @cached_property
    def place(self) -> np.ndarray:
        return len(self.levels) ** np.arange(self.group)

    def near_one(self, u: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Index of a codebook vector near each row of ``u`` (n, group) under weights ``w``: the best
        of the ``NEIGHBOURS`` nearest the group's lattice point (the nearest of all for 98-99% of
        groups; used where many scales are tried)."""
        key = _nearest_level(u, self.levels) @ self.place
        # sum w (u - v)^2 less its first term, sum w u^2, the same for every candidate
        score = np.einsum("nkj,nj->nk", self.near_stacked[key], np.concatenate([w, -2 * w * u], 1))
        return self.near[key, score.argmin(-1)]

    def search(self, u: np.ndarray, w: np.ndarray, exact: bool) -> np.ndarray:
        """:meth:`nearest` when ``exact`` or when the codebook is small enough that its matrix
        product beats the neighbour table's lookups (up to ``EXACT_UP_TO`` vectors); else :meth:`near_one`."""
        return self.nearest(u, w) if exact or len(self.vectors) <= EXACT_UP_TO else self.near_one(u, w)

    def nearest(self, u: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Index of the codebook vector nearest each row of ``u`` (n, group) under weights ``w``:
        of all of them, sum w (u - v)^2 = sum w u^2 - 2 sum (w u) v + sum w v^2, the last two terms
        for every vector at once as one matrix product of [w, -2 w u] and [v^2, v],
        ``NEAREST_ELEMENTS`` scores at a time."""
        out = np.empty(len(u), np.int64)
        step = max(1, NEAREST_ELEMENTS // len(self.vectors))
        for r in range(0, len(u), step):
            wr = w[r : r + step]
            out[r : r + step] = (np.concatenate([wr, -2 * wr * u[r : r + step]], 1) @ self.stacked).argmin(1)
        return out

    @cached_property
    def squares(self) -> np.ndarray:
        return self.vectors * self.vectors

    @cached_property
    def stacked(self) -> np.ndarray:
        """(2 group, K): the squares over the vectors, one column per codebook vector."""
        return np.ascontiguousarray(np.concatenate([self.squares, self.vectors], 1).T)


@dataclass
class CodebookGrid(Grid):
    """A codebook type's grid: the effective scale of every sub-block (``offset`` is zero), and the
    importance of each column that the groups' vectors are chosen under."""

    qtype: _CodebookType | None = None
    importance: np.ndarray | None = None

    @staticmethod
    def of_rows(parts: list[CodebookGrid]) -> CodebookGrid:
        first = parts[0]
        return CodebookGrid(np.concatenate([p.scale for p in parts]), np.concatenate([p.offset for p in parts]),
                            first.sub, 0, 0, None, {k: np.concatenate([p.fields[k] for p in parts]) for k in first.fields},
                            first.qtype, first.importance)

    @staticmethod
    def codes_of_rows(parts: list[Codes]) -> Codes:
        """The codes of a matrix from the codes of its consecutive row ranges."""
        return Codes(np.concatenate([c.index for c in parts]), np.concatenate([c.signs for c in parts]))

    def values(self, codes: Codes, c0: int = 0) -> np.ndarray:
        v, sign = self._magnitudes_and_signs(codes)
        return self._columns(self.scale, c0, c0 + v.shape[1]) * v * sign

    def integers(self, codes: Codes) -> tuple[np.ndarray, np.ndarray]:
        """Each weight as a signed integer and each sub-block's scale for it: ``values`` is exactly
        their product (codebook values are small integers, or multiples of 1/8 for IQ1)."""
        v, sign = self._magnitudes_and_signs(codes)
        step = self.qtype.integer_step
        return np.rint(v * sign / step).astype(np.int32), (self.scale * F32(step)).astype(F32)

    def _magnitudes_and_signs(self, codes: Codes) -> tuple[np.ndarray, np.ndarray]:
        rows = codes.index.shape[0]
        v = self.qtype.table[codes.index].reshape(rows, -1)
        sign = np.where(np.unpackbits(codes.signs, axis=1, bitorder="little")[:, : v.shape[1]] != 0, F32(-1), F32(1))
        return v, sign

    def round(self, w: np.ndarray, c0: int = 0, importance: np.ndarray | None = None) -> Codes:
        """The codes of ``w`` (rows, n), columns ``c0..c0+n`` (whole sign bytes), each group's vector
        chosen under ``importance`` (n,) (default: the importance the grid was fitted under)."""
        rows, n = w.shape
        if importance is None:
            importance = np.ones(n, F32) if self.importance is None else self.importance[c0 : c0 + n]
        weight = np.broadcast_to(np.asarray(importance, F32), w.shape)
        t, signs = self.qtype.targets(w, weight)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = self._columns(self.scale, c0, c0 + n)
            u = np.where(scale != 0, t / scale, 0).astype(F32)
        g = self.qtype.codebook.group
        index = self.qtype.choose(u.reshape(-1, g), np.ascontiguousarray(weight).reshape(-1, g), exact=True)
        return Codes(index.reshape(rows, -1).astype(np.int32), signs)


class _CodebookType(QuantType):
    """What the codebook types share; each type gives its codebook, geometry and byte layout."""

    block = 256
    qmin = qmax = 0
    gguf_type: type  # gguf-py's class (its grid and dequantizer)
    parity: bool  # 7 sign bits per 8 weights, the 8th their parity
    scale_levels = 16  # sub-block scales are 4-bit
    joint_columns = 8  # columns whose codes are chosen together (one sign byte)
    integer_step = 1.0  # the codebook's values are whole multiples of this

    @cached_property
    def codebook(self) -> Codebook:
        return Codebook(self.gguf_type)

    @property
    def table(self) -> np.ndarray:
        """The vector each index decodes to (before signs)."""
        return self.codebook.vectors

    def choose(self, u: np.ndarray, w: np.ndarray, exact: bool) -> np.ndarray:
        """The index for each group ``u`` (n, group) under weights ``w``: the nearest (``exact``) or
        the cheaper near one of the scale search."""
        return self.codebook.search(u, w, exact)

    def unit(self, s: np.ndarray, d: np.ndarray) -> np.ndarray:
        """The effective scale of sub-blocks with integer scales ``s`` under fp16 ``d`` (as float32),
        in the dequantizer's own float32 operations."""
        raise NotImplementedError

    def targets(self, w: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The magnitudes to fit (rows, n) and the sign bytes (rows, n // 8) of ``w``."""
        negative = w < 0
        t = np.abs(w).astype(F32)
        if self.parity:
            neg8, t8 = negative.reshape(-1, 8), t.reshape(-1, 8)
            odd = np.nonzero(neg8.sum(1) % 2 == 1)[0]
            cheapest = (weight * w * w).reshape(-1, 8)[odd].argmin(1)
            neg8[odd, cheapest] ^= True
            t8[odd, cheapest] *= -1
        return t, np.packbits(negative.reshape(w.shape[0], -1, 8), axis=2, bitorder="little").reshape(w.shape[0], -1)

    def _fit_rows(self, w, imp) -> CodebookGrid:
        rows, cols = w.shape
        weight = np.broadcast_to(imp, w.shape)
        t, _ = self.targets(w, weight)
        s_best = self._best_scales(t.reshape(-1, self.sub), np.ascontiguousarray(weight).reshape(-1, self.sub))
        s_best = s_best.reshape(-1, self.block // self.sub)  # per super-block
        units = self.unit(np.arange(self.scale_levels, dtype=np.uint8), np.ones((1, 1), F32))[0]  # increasing
        d = (s_best.max(1) / units[-1]).astype(F16)
        d32 = d.astype(F32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(d32 > 0, s_best / d32, 0)
        s = np.abs(ratio[..., None] - units).argmin(-1).astype(np.uint8)
        scale = self.unit(s, d32)
        n_sub = cols // self.sub
        return CodebookGrid(scale.reshape(rows, n_sub), np.zeros((rows, n_sub), F32), self.sub, 0, 0, None,
                            {"d": d.reshape(rows, -1), "s": s.reshape(rows, n_sub)}, self, imp)

    def _best_scales(self, t: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Per sub-block (rows of ``t``), the least-squares scale of the best of ``SCALE_TRIES``."""
        cb, n, sub = self.codebook, len(t), t.shape[1]
        top = np.abs(t).max(1)
        best, best_gain = np.zeros(n, F32), np.full(n, -1.0, F32)
        for k in SCALE_TRIES:
            d = np.where(top > 0, top / (cb.levels[-1] * k), 1).astype(F32)
            u = t / d[:, None]
            v = self.table[self.choose(u.reshape(-1, cb.group), weight.reshape(-1, cb.group), exact=False)].reshape(n, sub)
            sxl, sll = (weight * t * v).sum(1), (weight * v * v).sum(1)
            gain = np.where(sll > 0, sxl * sxl / np.where(sll > 0, sll, 1), 0)
            better = (gain > best_gain) & (sxl > 0)
            best[better], best_gain[better] = (sxl / sll)[better], gain[better]
        return best

    def pack(self, grid: CodebookGrid, codes: Codes) -> np.ndarray:
        rows = codes.index.shape[0]
        nb = rows * grid.scale.shape[1] // (self.block // self.sub)
        out = self._pack_blocks(codes.index.reshape(nb, -1), codes.signs.reshape(nb, 32),
                                grid.fields["s"].reshape(nb, -1), grid.fields["d"].reshape(nb, 1))
        assert out.shape[1] == self.nbytes
        return out.reshape(rows, -1)

    def unpack(self, data: np.ndarray) -> tuple[CodebookGrid, Codes]:
        rows = data.shape[0]
        blocks = np.ascontiguousarray(data).reshape(-1, self.nbytes)
        d, index, signs, s = self._unpack_blocks(blocks)
        scale = self.unit(s, d.astype(F32))
        grid = CodebookGrid(scale.reshape(rows, -1), np.zeros((rows, scale.size // rows), F32), self.sub, 0, 0, None,
                            {"d": d.reshape(rows, -1), "s": s.reshape(rows, -1)}, self, None)
        return grid, Codes(index.reshape(rows, -1).astype(np.int32), signs.reshape(rows, -1))

    def _pack_blocks(self, index, signs, s, d):  # per super-block -> (nblocks, nbytes)
        raise NotImplementedError

    def _unpack_blocks(self, b):  # -> d (fp16, (nb, 1)), index, signs (uint8, (nb, 32)), s (uint8, (nb, n_sub))
        raise NotImplementedError


def _iq2_unit(s, d):
    return d * (F32(0.5) + s.astype(F32)) * F32(0.25)


def _scale_nibbles(s: np.ndarray) -> np.ndarray:
    """4-bit scales two to a byte, the first low."""
    return (s[:, 0::2] & 15 | (s[:, 1::2] & 15) << 4).astype(np.uint8)


def _unscale_nibbles(b: np.ndarray) -> np.ndarray:
    return np.stack([b & 15, b >> 4], axis=-1).reshape(len(b), -1).astype(np.uint8)


def _seven_bit_words(signs: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per sub-block, four 7-bit sign indices and the 4-bit scale in one uint32 (IQ2_XXS, IQ3_XXS)."""
    seven = (signs & 127).astype(np.uint32).reshape(len(s), -1, 4)
    return (seven << np.array([0, 7, 14, 21], np.uint32)).sum(-1, dtype=np.uint32) | s.astype(np.uint32) << 28


def _signs_from_words(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_seven_bit_words`: the full sign bytes (parity restored) and the scales."""
    seven = ((words[..., None] >> np.array([0, 7, 14, 21], np.uint32)) & 127).astype(np.uint8).reshape(len(words), -1)
    return _with_parity(seven), (words >> 28).astype(np.uint8)


def _with_parity(seven: np.ndarray) -> np.ndarray:
    """7 sign bits and, as bit 7, their parity (an even count of minus signs)."""
    parity = np.unpackbits(seven[..., None], axis=-1).sum(-1) % 2
    return (seven | parity.astype(np.uint8) << 7).astype(np.uint8)


class IQ2_XXS(_CodebookType):
    ggml_type, gguf_type, nbytes, sub, parity = GGMLQuantizationType.IQ2_XXS, gguf.quants.IQ2_XXS, 66, 32, True
    unit = staticmethod(_iq2_unit)

    def _pack_blocks(self, index, signs, s, d):  # per 32 weights: 4 index bytes, then signs and scale
        words = _seven_bit_words(signs, s)
        per_sub = np.concatenate([index.astype(np.uint8).reshape(len(s), 8, 4),
                                  words.reshape(len(s), 8, 1).view(np.uint8)], axis=2)
        return _u8(d, per_sub.reshape(len(s), 64))

    def _unpack_blocks(self, b):
        per_sub = np.ascontiguousarray(b[:, 2:]).reshape(len(b), 8, 8)
        words = np.ascontiguousarray(per_sub[:, :, 4:]).view(np.uint32).reshape(len(b), 8)
        signs, s = _signs_from_words(words)
        return _f16_raw(b), per_sub[:, :, :4].reshape(len(b), 32), signs, s


class IQ2_XS(_CodebookType):
    ggml_type, gguf_type, nbytes, sub, parity = GGMLQuantizationType.IQ2_XS, gguf.quants.IQ2_XS, 74, 16, True
    unit = staticmethod(_iq2_unit)

    def _pack_blocks(self, index, signs, s, d):  # per 8 weights: 9-bit index | 7 sign bits << 9
        qs = (index.astype(np.uint16) | (signs & 127).astype(np.uint16) << 9).astype(np.uint16)
        return _u8(d, qs, _scale_nibbles(s))

    def _unpack_blocks(self, b):
        qs = np.ascontiguousarray(b[:, 2:66]).view(np.uint16)
        return _f16_raw(b), qs & 511, _with_parity((qs >> 9).astype(np.uint8)), _unscale_nibbles(b[:, 66:74])


class IQ2_S(_CodebookType):
    ggml_type, gguf_type, nbytes, sub, parity = GGMLQuantizationType.IQ2_S, gguf.quants.IQ2_S, 82, 16, False
    unit = staticmethod(_iq2_unit)

    def _pack_blocks(self, index, signs, s, d):  # low 8 index bits, signs, 2 high bits four to a byte, scales
        high = ((index >> 8) & 3).astype(np.uint8).reshape(len(s), 8, 4) << np.array([0, 2, 4, 6], np.uint8)
        return _u8(d, (index & 255).astype(np.uint8), signs, high.sum(-1, dtype=np.uint8), _scale_nibbles(s))

    def _unpack_blocks(self, b):
        high = (b[:, 66:74, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
        index = b[:, 2:34].astype(np.int32) | high.reshape(len(b), 32).astype(np.int32) << 8
        return _f16_raw(b), index, b[:, 34:66], _unscale_nibbles(b[:, 74:82])


class IQ3_XXS(_CodebookType):
    ggml_type, gguf_type, nbytes, sub, parity = GGMLQuantizationType.IQ3_XXS, gguf.quants.IQ3_XXS, 98, 32, True

    @staticmethod
    def unit(s, d):
        return d * (F32(0.5) + s.astype(F32)) * F32(0.5)

    def _pack_blocks(self, index, signs, s, d):  # 64 index bytes, then per 32 weights signs and scale
        return _u8(d, index.astype(np.uint8), _seven_bit_words(signs, s))

    def _unpack_blocks(self, b):
        signs, s = _signs_from_words(np.ascontiguousarray(b[:, 66:98]).view(np.uint32))
        return _f16_raw(b), b[:, 2:66], signs, s


class IQ3_S(_CodebookType):
    ggml_type, gguf_type, nbytes, sub, parity = GGMLQuantizationType.IQ3_S, gguf.quants.IQ3_S, 110, 32, False

    @staticmethod
    def unit(s, d):
        return d * (1 + 2 * s.astype(np.uint8))

    def _pack_blocks(self, index, signs, s, d):  # low 8 index bits, 9th bits eight to a byte, signs, scales
        high = np.packbits(((index >> 8) & 1).astype(np.uint8).reshape(len(s), 8, 8), axis=2, bitorder="little")
        return _u8(d, (index & 255).astype(np.uint8), high.reshape(len(s), 8), signs, _scale_nibbles(s))

    def _unpack_blocks(self, b):
        high = np.unpackbits(b[:, 66:74], axis=1, bitorder="little").astype(np.int32)
        return _f16_raw(b), b[:, 2:66].astype(np.int32) | high << 8, b[:, 74:106], _unscale_nibbles(b[:, 106:110])


class _IQ1(_CodebookType):
    """IQ1_S / IQ1_M: vectors of -1, 0 and +1 (2048 of them, signs included), each shifted by +delta
    or -delta (1/8), under 3-bit sub-block scales ``d * (2s + 1)``. An index here is the codebook
    index plus 2048 when the shift is negative; ``table`` decodes both halves."""

    parity = False
    scale_levels = 8
    integer_step = 0.125
    delta_groups: int  # groups sharing one shift

    @cached_property
    def table(self) -> np.ndarray:
        delta = F32(self.gguf_type.delta)
        return np.concatenate([self.codebook.vectors + delta, self.codebook.vectors - delta])

    @staticmethod
    def unit(s, d):
        return d * (2 * s.astype(np.uint16) + 1)

    def targets(self, w, weight):
        return w.astype(F32), np.zeros((w.shape[0], w.shape[1] // 8), np.uint8)  # the vectors hold the signs

    def choose(self, u, w, exact):
        """Both shifts tried; each run of ``delta_groups`` groups takes the one that fits it better."""
        cb, delta = self.codebook, F32(self.gguf_type.delta)
        found, cost = [], []
        for shift in (delta, -delta):
            index = cb.search(u - shift, w, exact)
            found.append(index)
            cost.append((w * (u - shift - cb.vectors[index]) ** 2).sum(1).reshape(-1, self.delta_groups).sum(1))
        negative = np.repeat(cost[1] < cost[0], self.delta_groups)
        return np.where(negative, found[1] + len(cb.vectors), found[0])


class IQ1_S(_IQ1):
    ggml_type, gguf_type, nbytes, sub = GGMLQuantizationType.IQ1_S, gguf.quants.IQ1_S, 50, 32
    delta_groups, joint_columns = 4, 32  # one shift per 32 weights: their codes are chosen together

    def _pack_blocks(self, index, signs, s, d):  # low 8 index bits; per 32 weights a uint16 of the rest
        base, negative = index & 2047, index[:, ::4] >> 11
        high = ((base >> 8) & 7).astype(np.uint16).reshape(len(s), 8, 4) << np.array([0, 3, 6, 9], np.uint16)
        qh = high.sum(-1, dtype=np.uint16) | s.astype(np.uint16) << 12 | negative.astype(np.uint16) << 15
        return _u8(d, (base & 255).astype(np.uint8), qh.astype(np.uint16))

    def _unpack_blocks(self, b):
        qh = np.ascontiguousarray(b[:, 34:50]).view(np.uint16).astype(np.int32)  # (nb, 8)
        high = (qh[..., None] >> np.array([0, 3, 6, 9])) & 7
        index = b[:, 2:34].astype(np.int32) | high.reshape(len(b), 32) << 8
        index |= np.repeat(qh >> 15, 4, axis=1) << 11
        return _f16_raw(b), index, np.zeros((len(b), 32), np.uint8), ((qh >> 12) & 7).astype(np.uint8)


class IQ1_M(_IQ1):
    ggml_type, gguf_type, nbytes, sub = GGMLQuantizationType.IQ1_M, gguf.quants.IQ1_M, 56, 16
    delta_groups = 1  # a shift per 8 weights

    def _pack_blocks(self, index, signs, s, d):  # low index bits; a nibble per group; scales with d's nibbles
        base, negative = index & 2047, index >> 11
        nibble = ((base >> 8) & 7 | negative << 3).astype(np.uint8)
        d_bits = d.view(np.uint16).astype(np.uint16)  # (nb, 1)
        d_nibbles = (d_bits >> np.array([0, 4, 8, 12], np.uint16)) & 15
        words = (s.astype(np.uint16).reshape(len(s), 4, 4) << np.array([0, 3, 6, 9], np.uint16)).sum(-1, dtype=np.uint16)
        words = (words | d_nibbles << 12).astype(np.uint16)
        return _u8((base & 255).astype(np.uint8), nibble[:, 0::2] | nibble[:, 1::2] << 4, words)

    def _unpack_blocks(self, b):
        nibbles = np.stack([b[:, 32:48] & 15, b[:, 32:48] >> 4], axis=-1).reshape(len(b), 32).astype(np.int32)
        index = b[:, :32].astype(np.int32) | (nibbles & 7) << 8 | (nibbles >> 3) << 11
        words = np.ascontiguousarray(b[:, 48:56]).view(np.uint16)
        d = ((words >> 12) << np.array([0, 4, 8, 12], np.uint16)).sum(-1, dtype=np.uint16)
        s = ((words[..., None] >> np.array([0, 3, 6, 9], np.uint16)) & 7).reshape(len(b), 16).astype(np.uint8)
        return d.reshape(-1, 1).view(F16), index, np.zeros((len(b), 32), np.uint8), s


def _f16_raw(b: np.ndarray) -> np.ndarray:
    """The fp16 ``d`` at the start of each block, as float16 (nblocks, 1)."""
    return np.ascontiguousarray(b[:, :2]).view(F16)


CODEBOOK_TYPES = (IQ1_S(), IQ1_M(), IQ2_XXS(), IQ2_XS(), IQ2_S(), IQ3_XXS(), IQ3_S())
TYPES.update({t.name: t for t in CODEBOOK_TYPES})
