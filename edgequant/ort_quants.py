"""ONNX Runtime's own weight grids: ``MatMulNBits`` configurations as quantization types.

An ONNX artifact gets a plan of its own (see :mod:`edgequant.pipeline`): each matrix takes one
configuration that ORT's CPU kernels run directly, named ``MNB{bits}_B{block}_{SYM|ZP}``:

* ``bits`` 4 or 8 unsigned codes;
* ``block`` 16 to 256 weights of a row sharing one scale, stored as float32 (the graph's
  activation type), so the scale costs ``32 / block`` bits per weight: 4-bit blocks of 32 are
  5.0 bpw, of 128 4.25;
* ``SYM``: the zero point is ORT's default ``2**(bits-1)`` and not stored (a weight is
  ``scale * (code - 8)`` at 4 bits); ``ZP``: an unsigned zero point per block, packed like the
  codes (two per byte at 4 bits), which fits an off-centre block better for 1/8 bit per weight
  more at blocks of 32.

Each configuration is a :class:`edgequant.ggml_quants.QuantType`, so RTN, GPTQ, the sensitivity
table and the planners use it as they use a ggml type (``get_type("MNB4_B32_SYM")``). Its bytes
per row are the graph's: codes, then the scales, then the zero points; :func:`exporters.onnx.nbits.from_ort` splits
them into the arrays the ONNX exporter writes. Rows whose width the block does not divide fall
back to the next smaller block (``FALLBACK``), as the ggml K-quants fall back to 32-blocks.

2-bit codes (which ORT's CPU kernel also takes) are not offered: their kernel speed is not
measured here yet.
"""

from __future__ import annotations

import numpy as np

from .ggml_quants import Grid, QuantType, search_affine, search_symmetric

F32 = np.float32
BLOCKS = (16, 32, 64, 128, 256)
PREFIX = "MNB"


class NBits(QuantType):
    """One ``MatMulNBits`` configuration: ``bits``-bit codes in blocks of ``block``, symmetric or
    with stored zero points."""

    ggml_type = None
    levels = None
    joint_columns = 1

    def __init__(self, bits: int, block: int, zero_points: bool):
        self.bits, self.block, self.sub, self.zero_points = bits, block, block, zero_points
        self.qmin, self.qmax = (0, (1 << bits) - 1) if zero_points else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        self.nbytes = block * bits / 8 + 4 + (bits / 8 if zero_points else 0)  # per block, on average

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.bits}_B{self.block}_{'ZP' if self.zero_points else 'SYM'}"

    def row_bytes(self, cols: int) -> int:
        n = cols // self.block
        return cols * self.bits // 8 + 4 * n + (self.zp_bytes(n) if self.zero_points else 0)

    def zp_bytes(self, n_blocks: int) -> int:
        """Bytes of one row's packed zero points."""
        return -(-n_blocks * self.bits // 8)

    def _fit_subblocks(self, x, w):
        half = 1 << (self.bits - 1)
        d = search_symmetric(x, w, -half, half - 1).astype(F32)
        if not self.zero_points:
            return d, np.zeros_like(d), {"d": d}
        # with zero points: the best affine grid with an integer zero point, or the symmetric one
        # (zero point 2**(bits-1)) where that fits better (a constant block, say)
        zp = np.full(len(x), half, F32)
        a, m = search_affine(x, w, self.qmax, min_at_most_zero=False)
        with np.errstate(divide="ignore", invalid="ignore"):
            a_zp = np.clip(np.rint(np.where(a > 0, -m / a, half)), 0, self.qmax).astype(F32)
        a = self._refit(x, w, a.astype(F32), a_zp)
        better = self._error(x, w, a, a_zp) < self._error(x, w, d, zp)
        d, zp = np.where(better, a, d).astype(F32), np.where(better, a_zp, zp)
        return d, (-d * zp).astype(F32), {"d": d, "zp": zp.astype(np.uint8)}

    def _codes(self, x, d, zp):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.clip(np.rint(np.where(d[:, None] != 0, x / d[:, None], 0) + zp[:, None]), 0, self.qmax) - zp[:, None]

    def _refit(self, x, w, d, zp):
        """The scale by weighted least squares for the codes it gives with zero point ``zp``."""
        lv = self._codes(x, d, zp)
        sll = (w * lv * lv).sum(-1)
        return np.maximum(np.where(sll > 0, (w * x * lv).sum(-1) / np.where(sll > 0, sll, 1), d), 0).astype(F32)

    def _error(self, x, w, d, zp):
        return (w * (x - d[:, None] * self._codes(x, d, zp)) ** 2).sum(-1)

    def pack(self, grid: Grid, q: np.ndarray) -> np.ndarray:
        """Bytes of the rows: the codes (``code - qmin``, packed little end first), the float32
        scales, and (``ZP``) the packed zero points."""
        parts = [pack_codes(q - self.qmin, self.bits), np.ascontiguousarray(grid.fields["d"], F32).view(np.uint8)]
        if self.zero_points:
            parts.append(pack_zero_points(grid.fields["zp"], self.bits))
        return np.concatenate(parts, axis=1)

    def fields(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The rows' bytes split as :meth:`pack` laid them out: the packed codes, the float32 scales
        and the zero points (unpacked; None when symmetric)."""
        cols = self.cols_of(data.shape[1])
        n, code_bytes = cols // self.block, cols * self.bits // 8
        data = np.asarray(data)
        scales = np.ascontiguousarray(data[:, code_bytes : code_bytes + 4 * n]).view(F32)
        zp = np.ascontiguousarray(unpack_codes(data[:, code_bytes + 4 * n :], self.bits)[:, :n]) if self.zero_points else None
        return np.ascontiguousarray(data[:, :code_bytes]), scales, zp

    def unpack(self, data: np.ndarray) -> tuple[Grid, np.ndarray]:
        packed, d, zp = self.fields(data)
        codes = unpack_codes(packed, self.bits).astype(np.int32)
        offset = -d * zp.astype(F32) if self.zero_points else np.zeros_like(d)
        return Grid(d, offset, self.sub, self.qmin, self.qmax, None, {}), codes + self.qmin

    def cols_of(self, row_bytes: int) -> int:
        """The row width whose bytes are ``row_bytes``."""
        cols = int(row_bytes / (self.bits / 8 + (4 + (self.bits / 8 if self.zero_points else 0)) / self.block))
        for c in range(cols - cols % self.block + self.block, 0, -self.block):
            if self.row_bytes(c) == row_bytes:
                return c
        raise ValueError(f"{self.name}: no row width takes {row_bytes} bytes")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (rows, n) packed little end first: (rows, n * bits / 8) uint8."""
    per_byte = 8 // bits
    c = codes.astype(np.uint8).reshape(codes.shape[0], -1, per_byte)
    out = np.zeros(c.shape[:2], np.uint8)
    for i in range(per_byte):
        out |= c[..., i] << (bits * i)
    return out


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """(rows, blocks) zero points as ORT stores them: ``bits`` each, packed like the codes, a row
    padded to a whole byte."""
    per_byte = 8 // bits
    rows, n = zp.shape
    padded = np.zeros((rows, -(-n // per_byte) * per_byte), np.uint8)
    padded[:, :n] = zp
    return pack_codes(padded, bits)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`."""
    mask = (1 << bits) - 1
    return np.stack([(packed >> (bits * i)) & mask for i in range(8 // bits)], -1).reshape(packed.shape[0], -1)


TYPES: dict[str, NBits] = {t.name: t for t in (NBits(b, k, z) for b in (4, 8) for k in BLOCKS for z in (False, True))}
FALLBACK = {t.name: NBits(t.bits, t.block // 2, t.zero_points).name for t in TYPES.values() if t.block > BLOCKS[0]}
# what a part of the ONNX plan can take (:mod:`edgequant.sensitivity`), smallest first: 4-bit blocks of 256
# to 32, with and without zero points, and 8 bits in blocks of 32. Measured on the default model's first
# blocks, 4-bit blocks of 16 (6.0 bpw) bought no less KL than blocks of 32 with zero points (5.1 bpw); each
# candidate costs the sensitivity table a measurement per part. 8-bit blocks of 64 or 128 measure as
# well as 32 in torch, but ORT's int8 path (accuracy_level 4) quantizes the activations in blocks of the
# weights' block: the README's first build in 8-bit blocks of 64 scored KLD 0.0038 in ORT against its GGUF's
# 0.0019 (Q8_0), which ORT matched within 15% when it ran those same codes in blocks of 32.
CANDIDATES = tuple(sorted((n for n, t in TYPES.items() if (t.bits == 4 and t.block >= 32) or (t.bits == 8 and t.block == 32
                                                                                             and not t.zero_points)),
                          key=lambda n: TYPES[n].nbytes / TYPES[n].block))


def is_ort_type(name: str) -> bool:
    return name.upper().startswith(PREFIX)
