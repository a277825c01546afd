"""Exact ggml block encoders: weights -> the bytes llama.cpp reads.

Each ggml type is one small class. Quantizing a tensor is two steps, kept apart so that
GPTQ can reuse the first one and choose the integer codes itself:

1. ``fit(w, importance)`` searches the block scales (and mins) and returns a :class:`Grid`:
   for every row and every sub-block, the effective ``scale`` and ``offset`` that the
   dequantizer will compute, so a code ``q`` decodes to ``scale * level(q) + offset``.
2. ``pack(grid, q)`` writes the codes and the stored scale fields in ggml's byte layout.

``unpack(data)`` reads the bytes back into the same grid and codes, so other formats (the ONNX
exporter) can reuse the very codes that llama.cpp runs.

``Grid.values(q)`` reproduces gguf-py's dequantizer bit for bit (same float32 operations),
and the tests check exactly that. The scale search minimises the (importance-weighted)
squared error directly: a set of candidate scales per sub-block, each refined by weighted
least squares, the best kept; K-quant sub-block scales are then quantized onto their 4/6/8-bit
super-block grid and the codes re-rounded on the final grid.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType

F16 = np.float16
F32 = np.float32
IQ4_NL_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], F32)
_CHUNK_ELEMENTS = 1 << 18  # rows are fitted in chunks of about this many weights (1 MB: their
# temporaries stay in cache; chunks of 2M weights took twice as long)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="encode")


@dataclass
class Grid:
    """The quantization grid chosen for one 2-D tensor, per row and per sub-block.

    ``scale``/``offset`` have shape (rows, cols // sub). ``levels`` is the codebook for
    non-uniform types (IQ4_NL), else codes are the integers ``qmin..qmax`` themselves.
    ``fields`` holds the stored per-block fields (fp16 d, integer sub-scales...) for ``pack``.
    """

    scale: np.ndarray
    offset: np.ndarray
    sub: int
    qmin: int
    qmax: int
    levels: np.ndarray | None
    fields: dict[str, np.ndarray]

    @staticmethod
    def of_rows(parts: list[Grid]) -> Grid:
        """The grid of a matrix from the grids of its consecutive row ranges (of one type)."""
        first = parts[0]
        if len(parts) == 1:
            return first
        return Grid(np.concatenate([p.scale for p in parts]), np.concatenate([p.offset for p in parts]), first.sub,
                    first.qmin, first.qmax, first.levels,
                    {k: np.concatenate([p.fields[k] for p in parts]) for k in first.fields})

    @staticmethod
    def codes_of_rows(parts: list[np.ndarray]) -> np.ndarray:
        """The codes of a matrix from the codes of its consecutive row ranges."""
        return np.concatenate(parts)

    def _columns(self, a: np.ndarray, c0: int, c1: int) -> np.ndarray:
        """Per-sub-block array ``a`` (rows, n_sub) spread over columns ``c0..c1``."""
        return a[:, np.arange(c0, c1) // self.sub]

    def values(self, q: np.ndarray, c0: int = 0) -> np.ndarray:
        """Decode codes ``q`` (rows, n) covering columns ``c0..c0+n`` to float32."""
        c1 = c0 + q.shape[1]
        lv = self.levels[q] if self.levels is not None else q.astype(F32)
        return self._columns(self.scale, c0, c1) * lv + self._columns(self.offset, c0, c1)

    def round(self, w: np.ndarray, c0: int = 0) -> np.ndarray:
        """Nearest code for each weight of ``w`` (rows, n) covering columns ``c0..c0+n``."""
        c1 = c0 + w.shape[1]
        scale, offset = self._columns(self.scale, c0, c1), self._columns(self.offset, c0, c1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(scale != 0, (w - offset) / scale, 0).astype(F32)
        if self.levels is None:
            return np.clip(np.rint(t), self.qmin, self.qmax).astype(np.int32)
        return _nearest_level(t, self.levels)


def _nearest_level(t: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook level, via a table over floor(2t) (the midpoints of
    integer levels are multiples of 1/2, so floor(2t) decides which side of each it lies)."""
    lut, lo = _level_table(tuple(levels.tolist()))
    k = np.clip(np.floor(2 * t), lo, lo + len(lut) - 1).astype(np.int64) - lo
    return lut[k]


@lru_cache(maxsize=8)
def _level_table(levels: tuple[float, ...]) -> tuple[np.ndarray, int]:
    twice_mids = np.array([a + b for a, b in zip(levels, levels[1:])])
    lo, hi = int(twice_mids[0]) - 1, int(twice_mids[-1]) + 1
    k = np.arange(lo, hi + 1)
    return (twice_mids[None, :] <= k[:, None]).sum(1).astype(np.int32), lo


# ---------------------------------------------------------------- scale search on sub-blocks


def _dot(a, b):
    return np.einsum("ij,ij->i", a, b)


def search_symmetric(x, w, qmin, qmax, levels=None, ntry=10):
    """Scale d per row of ``x`` (N, n) minimising sum w (x - d*level)^2 over a candidate set.

    Candidates map the largest-magnitude weight onto either end of the grid, nudged by a
    fraction of one grid step; each candidate's codes are refit by least squares
    (d = sum w x L / sum w L^2, error = sum w x^2 - (sum w x L)^2 / sum w L^2).
    """
    lo, hi = (qmin, qmax) if levels is None else (levels[0], levels[-1])
    step = 1.0 if levels is None else float(levels[1] - levels[0])
    ext = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], -1)
    wx = w * x
    best_d = np.zeros(len(x), F32)
    best_gain = np.full(len(x), -1.0, F32)  # (sum w x L)^2 / sum w L^2: larger is better
    for end in (lo, hi):
        for delta in np.linspace(-0.9, 0.9, ntry, dtype=F32) * F32(step):
            with np.errstate(divide="ignore", invalid="ignore"):
                inv = np.where(ext != 0, (F32(end) + delta) / ext, 0).astype(F32)
            t = x * inv
            lv = np.clip(np.rint(t), qmin, qmax) if levels is None else levels[_nearest_level(t, levels)]
            sxl, sll = _dot(wx, lv), _dot(w, lv * lv)
            ok = sll > 0
            sll = np.where(ok, sll, 1)
            gain = np.where(ok, sxl * sxl / sll, 0)
            better = gain > best_gain
            best_d[better], best_gain[better] = (sxl / sll)[better], gain[better]
    return best_d


def search_affine(x, w, nmax, ntry=16, min_at_most_zero=True):
    """(d, m) per row of ``x`` (N, n) minimising sum w (x - (d*L + m))^2 with L in 0..nmax.

    ``min_at_most_zero`` is the K-quant constraint (they store -m as an unsigned integer).
    """
    xmin, xmax = x.min(-1), x.max(-1)
    if min_at_most_zero:
        xmin = np.minimum(xmin, 0)
    span = np.where(xmax > xmin, xmax - xmin, 1).astype(F32)
    sw, sx, sxx = w.sum(-1), _dot(w, x), _dot(w * x, x)
    best = (np.zeros(len(x), F32), xmin.astype(F32), np.full(len(x), np.inf, F32))
    for delta in np.linspace(-1.0, 1.0, ntry, dtype=F32):
        iscale = ((nmax + delta) / span)[:, None]
        lv = np.clip(np.rint((x - xmin[:, None]) * iscale), 0, nmax)
        wl = w * lv
        sl, sll, sxl = wl.sum(-1), _dot(wl, lv), _dot(wl, x)
        d, m = _weighted_ls_affine(sw, sl, sll, sx, sxl, min_at_most_zero)
        # sum w (x - dL - m)^2 expanded in the sums above
        err = sxx + d * d * sll + m * m * sw - 2 * d * sxl - 2 * m * sx + 2 * d * m * sl
        better = err < best[2]
        for arr, new in zip(best, (d, m, err)):
            arr[better] = new[better]
    return best[0], best[1]


def _weighted_ls_affine(sw, sl, sll, sx, sxl, min_at_most_zero):
    det = sw * sll - sl * sl
    ok = det > 0
    safe = np.where(ok, det, 1)
    d = np.where(ok, (sw * sxl - sl * sx) / safe, 0)
    m = np.where(ok, (sll * sx - sl * sxl) / safe, np.where(sw > 0, sx / np.where(sw > 0, sw, 1), 0))
    if min_at_most_zero:
        clamp = m > 0
        d = np.where(clamp, np.where(sll > 0, sxl / np.where(sll > 0, sll, 1), 0), d)
        m = np.where(clamp, 0, m)
    return np.maximum(d, 0), m


def _quantize_subscales(s, nmax, signed):
    """Put sub-block scales ``s`` (N, nsub) on a super-block grid: fp16 d times integers.

    Returns (d as float16 (N,), integer sub-scales (N, nsub)). Unsigned grids use 0..nmax,
    signed ones -nmax-1..nmax with the largest magnitude mapped onto -nmax-1.
    """
    if signed:
        ext = np.take_along_axis(s, np.abs(s).argmax(-1)[:, None], -1)[:, 0]
        d = (ext / -(nmax + 1)).astype(F16)
        lo = -(nmax + 1)
    else:
        d = (s.max(-1) / nmax).astype(F16)
        lo = 0
    d32 = d.astype(F32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ints = np.where(d32 != 0, np.rint(s / d32), 0)
    return d, np.clip(ints, lo, nmax).astype(np.int32)


# ---------------------------------------------------------------------------- the types


@dataclass
class EncodedTensor:
    """One tensor as it will be stored: ggml type name and bytes (rows, row_bytes) in HF row order."""

    ggml_type: str
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


class QuantType:
    """One ggml quantization type: block geometry, scale search and byte packing."""

    ggml_type: GGMLQuantizationType
    block: int  # weights per block
    nbytes: int  # bytes per block
    sub: int  # weights sharing one effective scale
    qmin: int  # code range (codebook indices for IQ4_NL)
    qmax: int
    levels: np.ndarray | None = None  # codebook of non-uniform types
    joint_columns = 1  # columns whose codes GPTQ chooses together (a codebook type's sign unit)

    @property
    def name(self) -> str:
        return self.ggml_type.name

    @property
    def bpw(self) -> float:
        return self.nbytes * 8 / self.block

    def fits(self, row_length: int) -> bool:
        return row_length % self.block == 0

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of ``cols`` weights."""
        return cols // self.block * self.nbytes

    def tensor_bytes(self, rows: int, cols: int) -> int:
        return rows * self.row_bytes(cols)

    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """Round-to-nearest on the best grid: (rows, cols) float -> (rows, cols/block*nbytes) uint8."""
        w = np.asarray(w, F32)
        out = np.empty((w.shape[0], self.row_bytes(w.shape[1])), np.uint8)
        return self._by_chunks(w, importance, out, lambda chunk, grid: self.pack(grid, grid.round(chunk)))

    def dequantized(self, w: np.ndarray, importance: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """What ``quantize`` stores, decoded back to float32 (for error measurements), into
        ``out`` if given (it may be ``w`` itself)."""
        w = np.asarray(w, F32)
        out = np.empty_like(w) if out is None else out
        return self._by_chunks(w, importance, out, lambda chunk, grid: grid.values(grid.round(chunk)))

    def _by_chunks(self, w: np.ndarray, importance: np.ndarray | None, out: np.ndarray, finish) -> np.ndarray:
        """``out`` filled with ``finish(rows, their grid)`` chunk of rows by chunk. Rows are fitted
        and rounded on their own, so a matrix's temporaries stay the size of a chunk (a 151936-row
        embedding's took 8 GB at once), and chunks go to one thread per core (numpy lets go of the
        GIL inside its array operations)."""
        step = max(1, _CHUNK_ELEMENTS // w.shape[1])

        def one(r: int) -> None:
            out[r : r + step] = finish(w[r : r + step], self.fit(w[r : r + step], importance))

        chunks = [_pool().submit(one, r) for r in range(0, len(w), step)]
        try:
            for chunk in chunks:
                chunk.result()
        except BaseException:  # no chunk may go on writing into ``out`` once this has failed
            for chunk in chunks:
                chunk.cancel()
            wait(chunks)
            raise
        return out

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> Grid:
        """Choose the grid for ``w`` (rows, cols); ``importance`` (cols,) weights the error."""
        w = np.asarray(w, F32)
        rows, cols = w.shape
        if not self.fits(cols):
            raise ValueError(f"{self.name} needs rows of a multiple of {self.block} weights, got {cols}")
        imp = np.ones(cols, F32) if importance is None else np.asarray(importance, F32)
        imp = np.maximum(imp, imp.max() * 1e-6 if imp.max() > 0 else 1.0)
        step = max(1, _CHUNK_ELEMENTS // cols)
        parts = [self._fit_rows(w[r : r + step], imp) for r in range(0, rows, step)]
        return parts[0].of_rows(parts)

    def _fit_rows(self, w, imp) -> Grid:
        rows, cols = w.shape
        x = w.reshape(-1, self.sub)
        wt = np.broadcast_to(imp.reshape(1, -1), w.shape).reshape(-1, self.sub)
        scale, offset, fields = self._fit_subblocks(x, wt)
        n_sub = cols // self.sub
        fields = {k: v.reshape(rows, -1) for k, v in fields.items()}
        return Grid(scale.reshape(rows, n_sub), offset.reshape(rows, n_sub), self.sub, self.qmin, self.qmax,
                    self.levels, fields)

    def pack(self, grid: Grid, q: np.ndarray) -> np.ndarray:
        """Bytes of the tensor: (rows, cols/block*nbytes) uint8."""
        rows = q.shape[0]
        blocks = q.reshape(-1, self.block)
        fields = {k: v.reshape(len(blocks), -1) for k, v in grid.fields.items()}
        out = self._pack_blocks(blocks, fields)
        assert out.shape[1] == self.nbytes
        return out.reshape(rows, -1)

    def unpack(self, data: np.ndarray) -> tuple[Grid, np.ndarray]:
        """Inverse of ``pack``: bytes (rows, row_bytes) -> the grid and the codes (rows, cols)."""
        rows = data.shape[0]
        blocks = np.ascontiguousarray(data).reshape(-1, self.nbytes)
        q, scale, offset = self._unpack_blocks(blocks)
        grid = Grid(scale.reshape(rows, -1), offset.reshape(rows, -1), self.sub, self.qmin, self.qmax, self.levels, {})
        return grid, q.reshape(rows, -1).astype(np.int32)

    def _fit_subblocks(self, x, w):  # -> scale (N,), offset (N,), fields
        raise NotImplementedError

    def _unpack_blocks(self, b):  # (nblocks, nbytes) -> codes (nblocks, block), scale and offset (nblocks, n_sub)
        raise NotImplementedError

    def _pack_blocks(self, q, fields):  # (nblocks, block) codes -> (nblocks, nbytes)
        raise NotImplementedError


def _u8(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate([np.ascontiguousarray(p).view(np.uint8) for p in parts], axis=1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Pack (N, 2k) 4-bit values as low nibbles = first half, high nibbles = second half."""
    half = q.shape[1] // 2
    return (q[:, :half] & 15 | (q[:, half:] & 15) << 4).astype(np.uint8)


def _bits_of(q: np.ndarray, shift: int, width: int, groups: int) -> np.ndarray:
    """Pack bit-field ``(q >> shift) & mask`` of (N, groups*32) into (N, 32) bytes, group g at bit g*width."""
    n = q.shape[0]
    f = ((q >> shift) & ((1 << width) - 1)).reshape(n, groups, 32).astype(np.uint8)
    out = np.zeros((n, 32), np.uint8)
    for g in range(groups):
        out |= f[:, g] << (g * width)
    return out


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte ``at`` of each block, as float32 (nblocks, 1)."""
    return np.ascontiguousarray(b[:, at : at + 2]).view(F16).astype(F32)


def _unnibble(b: np.ndarray) -> np.ndarray:
    """Inverse of ``_nibbles``: (N, k) bytes -> (N, 2k) values, low nibbles first."""
    return np.concatenate([b & 15, b >> 4], axis=1).astype(np.int32)


def _unbits(b: np.ndarray, width: int, groups: int) -> np.ndarray:
    """Inverse of ``_bits_of`` (shift 0): (N, 32) bytes -> (N, groups*32) fields."""
    return np.concatenate([(b >> (g * width)) & ((1 << width) - 1) for g in range(groups)], axis=1).astype(np.int32)


def _both_halves(b: np.ndarray, unpack_half) -> np.ndarray:
    """Inverse of ``_two_halves``: unpack each half of the bytes and join the 128-weight halves."""
    half = b.shape[1] // 2
    return np.concatenate([unpack_half(b[:, :half]), unpack_half(b[:, half:])], axis=1)


class _Symmetric32(QuantType):
    """d (fp16) times a signed integer, one scale per 32 weights: Q4_0, Q5_0, Q8_0."""

    block = sub = 32

    def _fit_subblocks(self, x, w):
        d = search_symmetric(x, w, self.qmin, self.qmax).astype(F16)
        return d.astype(F32), np.zeros(len(x), F32), {"d": d[:, None]}


class Q4_0(_Symmetric32):
    ggml_type, nbytes, qmin, qmax = GGMLQuantizationType.Q4_0, 18, -8, 7

    def _pack_blocks(self, q, f):
        return _u8(f["d"], _nibbles(q + 8))

    def _unpack_blocks(self, b):
        d = _f16(b, 0)
        return _unnibble(b[:, 2:]) - 8, d, np.zeros_like(d)


class Q5_0(_Symmetric32):
    ggml_type, nbytes, qmin, qmax = GGMLQuantizationType.Q5_0, 22, -16, 15

    def _pack_blocks(self, q, f):
        u = q + 16
        return _u8(f["d"], _high_bits32(u), _nibbles(u))

    def _unpack_blocks(self, b):
        d = _f16(b, 0)
        return _unnibble(b[:, 6:]) + 16 * _unhigh_bits32(b[:, 2:6]) - 16, d, np.zeros_like(d)


class Q8_0(_Symmetric32):
    # -128 is left out: some SIMD dot products take |q| with a sign trick that overflows on it.
    ggml_type, nbytes, qmin, qmax = GGMLQuantizationType.Q8_0, 34, -127, 127

    def _pack_blocks(self, q, f):
        return _u8(f["d"], q.astype(np.int8))

    def _unpack_blocks(self, b):
        d = _f16(b, 0)
        return b[:, 2:].view(np.int8).astype(np.int32), d, np.zeros_like(d)


def _high_bits32(u: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 codes as one little-endian uint32 (Q5_0/Q5_1's qh)."""
    bits = ((u >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(-1, dtype=np.uint32)[:, None]


def _unhigh_bits32(b: np.ndarray) -> np.ndarray:
    """Inverse of ``_high_bits32``: (N, 4) bytes -> (N, 32) bits."""
    word = np.ascontiguousarray(b).view(np.uint32)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32)


class IQ4_NL(_Symmetric32):
    """fp16 d times a fixed non-uniform 16-level codebook."""

    ggml_type, nbytes, qmin, qmax = GGMLQuantizationType.IQ4_NL, 18, 0, 15
    levels = IQ4_NL_LEVELS

    def _fit_subblocks(self, x, w):
        d = search_symmetric(x, w, 0, 15, levels=self.levels).astype(F16)
        return d.astype(F32), np.zeros(len(x), F32), {"d": d[:, None]}

    def _pack_blocks(self, q, f):
        return _u8(f["d"], _nibbles(q))

    def _unpack_blocks(self, b):
        d = _f16(b, 0)
        return _unnibble(b[:, 2:]), d, np.zeros_like(d)


class _Affine32(QuantType):
    """d * q + m with fp16 d and m, one pair per 32 weights: Q4_1, Q5_1."""

    block = sub = 32
    qmin = 0

    def _fit_subblocks(self, x, w):
        d, m = search_affine(x, w, self.qmax, min_at_most_zero=False)
        d16, m16 = d.astype(F16), m.astype(F16)
        return d16.astype(F32), m16.astype(F32), {"d": d16[:, None], "m": m16[:, None]}


class Q4_1(_Affine32):
    ggml_type, nbytes, qmax = GGMLQuantizationType.Q4_1, 20, 15

    def _pack_blocks(self, q, f):
        return _u8(f["d"], f["m"], _nibbles(q))

    def _unpack_blocks(self, b):
        return _unnibble(b[:, 4:]), _f16(b, 0), _f16(b, 2)


class Q5_1(_Affine32):
    ggml_type, nbytes, qmax = GGMLQuantizationType.Q5_1, 24, 31

    def _pack_blocks(self, q, f):
        return _u8(f["d"], f["m"], _high_bits32(q), _nibbles(q))

    def _unpack_blocks(self, b):
        return _unnibble(b[:, 8:]) + 16 * _unhigh_bits32(b[:, 4:8]), _f16(b, 0), _f16(b, 2)


class _KQuant(QuantType):
    """Super-blocks of 256 weights: sub-block scales stored as small integers times fp16 d."""

    block = 256
    scale_max: int  # largest integer sub-scale

    def _fit_subblocks(self, x, w):
        n_sub = self.block // self.sub
        if self.qmin == 0 and self.levels is None:  # affine: d*sc*q - dmin*m
            s, m = search_affine(x, w, self.qmax)
            d, sc = _quantize_subscales(s.reshape(-1, n_sub), self.scale_max, signed=False)
            dmin, mn = _quantize_subscales((-m).reshape(-1, n_sub), self.scale_max, signed=False)
            scale = d.astype(F32)[:, None] * sc.astype(F32)
            offset = -(dmin.astype(F32)[:, None] * mn.astype(F32))
            fields = {"d": d[:, None], "dmin": dmin[:, None], "sc": sc, "mn": mn}
        else:  # symmetric: d*sc*q (q a codebook value for IQ4_XS)
            s = search_symmetric(x, w, self.qmin, self.qmax, levels=self.levels)
            d, sc = _quantize_subscales(s.reshape(-1, n_sub), self.scale_max, signed=True)
            scale = d.astype(F32)[:, None] * sc.astype(F32)
            offset = np.zeros_like(scale)
            fields = {"d": d[:, None], "sc": sc}
        return scale.reshape(-1), offset.reshape(-1), fields


class Q2_K(_KQuant):
    ggml_type, nbytes, sub, qmin, qmax, scale_max = GGMLQuantizationType.Q2_K, 84, 16, 0, 3, 15

    def _pack_blocks(self, q, f):
        scales = (f["sc"] | f["mn"] << 4).astype(np.uint8)
        return _u8(scales, _two_halves(q, lambda h: _bits_of(h, 0, 2, 4)), f["d"], f["dmin"])

    def _unpack_blocks(self, b):
        sc, mn = (b[:, :16] & 15).astype(F32), (b[:, :16] >> 4).astype(F32)
        q = _both_halves(b[:, 16:80], lambda h: _unbits(h, 2, 4))
        return q, _f16(b, 80) * sc, -_f16(b, 82) * mn


def _two_halves(q, pack_half):
    """Apply ``pack_half`` to weights 0..127 and 128..255 of each block and join the bytes."""
    return np.concatenate([pack_half(q[:, :128]), pack_half(q[:, 128:])], axis=1)


class Q3_K(_KQuant):
    ggml_type, nbytes, sub, qmin, qmax, scale_max = GGMLQuantizationType.Q3_K, 110, 16, -4, 3, 31

    def _pack_blocks(self, q, f):
        u = q + 4
        hmask = _bits_of(u, 2, 1, 8)
        low = _two_halves(u, lambda h: _bits_of(h, 0, 2, 4))
        s6 = (f["sc"] + 32).astype(np.uint8)
        lo = s6[:, :8] & 15 | (s6[:, 8:] & 15) << 4
        hi = np.zeros((len(q), 4), np.uint8)
        for j in range(4):
            hi |= ((s6[:, 4 * j : 4 * j + 4] >> 4) & 3) << (2 * j)
        return _u8(hmask, low, lo, hi, f["d"])

    def _unpack_blocks(self, b):
        high = _unbits(b[:, :32], 1, 8)
        low = _both_halves(b[:, 32:96], lambda h: _unbits(h, 2, 4))
        lo, hi = b[:, 96:104], b[:, 104:108]
        s6 = np.concatenate([lo & 15, lo >> 4], axis=1).astype(np.int32)
        s6 |= np.concatenate([(hi >> (2 * j)) & 3 for j in range(4)], axis=1).astype(np.int32) << 4
        scale = _f16(b, 108) * (s6 - 32).astype(F32)
        return low + 4 * high - 4, scale, np.zeros_like(scale)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins in Q4_K/Q5_K's 12 bytes."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    b0 = sc[:, :4] & 63 | (sc[:, 4:] >> 4) << 6
    b1 = mn[:, :4] & 63 | (mn[:, 4:] >> 4) << 6
    b2 = sc[:, 4:] & 15 | (mn[:, 4:] & 15) << 4
    return np.concatenate([b0, b1, b2], axis=1)


def _unpack_k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``_pack_k_scales``: 12 bytes -> eight 6-bit scales and eight 6-bit mins."""
    b0, b1, b2 = b[:, :4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([b0 & 63, (b2 & 15) | (b0 >> 6) << 4], axis=1)
    mn = np.concatenate([b1 & 63, (b2 >> 4) | (b1 >> 6) << 4], axis=1)
    return sc.astype(F32), mn.astype(F32)


def _k_affine(b: np.ndarray, q: np.ndarray):
    """Q4_K/Q5_K: codes plus d*sc scales and -dmin*m offsets from the block header."""
    sc, mn = _unpack_k_scales(b[:, 4:16])
    return q, _f16(b, 0) * sc, -_f16(b, 2) * mn


def _k_nibbles(q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low nibbles: each 64 weights -> 32 bytes (first 32 low, next 32 high)."""
    n = q.shape[0]
    return _nibbles((q & 15).reshape(-1, 64)).reshape(n, 128)


def _k_unnibbles(b: np.ndarray) -> np.ndarray:
    """Inverse of ``_k_nibbles``."""
    return _unnibble(b.reshape(-1, 32)).reshape(len(b), 256)


class Q4_K(_KQuant):
    ggml_type, nbytes, sub, qmin, qmax, scale_max = GGMLQuantizationType.Q4_K, 144, 32, 0, 15, 63

    def _pack_blocks(self, q, f):
        return _u8(f["d"], f["dmin"], _pack_k_scales(f["sc"], f["mn"]), _k_nibbles(q))

    def _unpack_blocks(self, b):
        return _k_affine(b, _k_unnibbles(b[:, 16:]))


class Q5_K(_KQuant):
    ggml_type, nbytes, sub, qmin, qmax, scale_max = GGMLQuantizationType.Q5_K, 176, 32, 0, 31, 63

    def _pack_blocks(self, q, f):
        return _u8(f["d"], f["dmin"], _pack_k_scales(f["sc"], f["mn"]), _bits_of(q, 4, 1, 8), _k_nibbles(q))

    def _unpack_blocks(self, b):
        return _k_affine(b, _k_unnibbles(b[:, 48:]) + 16 * _unbits(b[:, 16:48], 1, 8))


class Q6_K(_KQuant):
    ggml_type, nbytes, sub, qmin, qmax, scale_max = GGMLQuantizationType.Q6_K, 210, 16, -32, 31, 127

    def _pack_blocks(self, q, f):
        u = q + 32
        ql = _two_halves(u, lambda h: _nibbles(h.reshape(-1, 128)))
        qh = _two_halves(u, lambda h: _bits_of(h, 4, 2, 4))
        return _u8(ql, qh, f["sc"].astype(np.int8), f["d"])

    def _unpack_blocks(self, b):
        low = _both_halves(b[:, :128], _unnibble)
        high = _both_halves(b[:, 128:192], lambda h: _unbits(h, 2, 4))
        scale = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(F32)
        return low + 16 * high - 32, scale, np.zeros_like(scale)


class IQ4_XS(_KQuant):
    """IQ4_NL's codebook in super-blocks of 256: a signed 6-bit scale per 32 weights times fp16 d.
    Layout: d, the scales' high 2 bits (one uint16), their low 4 bits (4 bytes), then per 32
    weights 16 bytes of nibbles (the first 16 weights low, the next 16 high)."""

    ggml_type, nbytes, sub, qmin, qmax, scale_max = GGMLQuantizationType.IQ4_XS, 136, 32, 0, 15, 31
    levels = IQ4_NL_LEVELS

    def _pack_blocks(self, q, f):
        ls = (f["sc"] + 32).astype(np.uint16)  # (N, 8) in 0..63
        high = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint16))).sum(-1, dtype=np.uint16)[:, None]
        low = (ls[:, 0::2] & 15 | (ls[:, 1::2] & 15) << 4).astype(np.uint8)
        return _u8(f["d"], high, low, _nibbles(q.reshape(-1, 32)).reshape(len(q), 128))

    def _unpack_blocks(self, b):
        high = np.ascontiguousarray(b[:, 2:4]).view(np.uint16).astype(np.int32)
        low = np.stack([b[:, 4:8] & 15, b[:, 4:8] >> 4], axis=-1).reshape(len(b), 8).astype(np.int32)
        ls = low | ((high >> (2 * np.arange(8))) & 3) << 4
        scale = _f16(b, 0) * (ls - 32).astype(F32)
        return _unnibble(b[:, 8:].reshape(-1, 16)).reshape(len(b), 256), scale, np.zeros_like(scale)


TYPES: dict[str, QuantType] = {
    t.name: t for t in (Q8_0(), Q6_K(), Q5_1(), Q5_K(), Q5_0(), Q4_1(), Q4_K(), Q4_0(), IQ4_NL(), IQ4_XS(), Q3_K(),
                        Q2_K())
}
from . import ggml_iquants  # noqa: E402, F401  (adds the codebook i-quants, built on the classes above, to TYPES)
from . import ort_quants  # noqa: E402  (ONNX Runtime's MatMulNBits grids, on the same interface; not ggml types)


def get_type(name: str) -> QuantType:
    """The ggml type, or ONNX Runtime configuration (:mod:`edgequant.ort_quants`), called ``name``."""
    key = name.upper()
    try:
        return TYPES[key] if key in TYPES else ort_quants.TYPES[key]
    except KeyError:
        raise ValueError(f"unknown ggml type {name!r}; known: {', '.join(TYPES)}") from None
