"""GGUF tensors -> ONNX Runtime's blockwise formats (``MatMulNBits``, ``GatherBlockQuantized``).

The ggml codes are reused, not re-rounded. ORT stores ``scale * (code - zero_point)`` per block
of ``block_size`` weights with 2-, 4- or 8-bit unsigned codes, so:

* **symmetric ggml types** (Q4_0, Q3_K, Q5_0, Q6_K, Q8_0, IQ4_NL: ``d * q``) map exactly: the
  signed code (for IQ4_NL its codebook value, an int8) is shifted by the default zero point
  ``2**(bits-1)``. Width: 4 bits when every code fits in -8..7 (Q4_0, Q3_K), else 8. The block is
  the ggml sub-block (32, or 16 for Q3_K/Q6_K) and the scale is ggml's effective ``d`` (or
  ``d * sub_scale``), kept in float32 so the product is exact.
* **affine ggml types** (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K: ``a * q - b``) have a float offset that no
  integer zero point can hold at their own width. ORT's CPU kernel accepts float zero points only
  for 2/4 bits and then runs 30-50x slower than with integer ones (measured on this host), so
  these go to 8 bits: ``code = k * q + z0`` with ``scale = a / k`` and an integer zero point
  ``round(k * b / a) + z0``, ``k`` as large as 8 bits allow (8 for 5-bit codes, 17 for 4-bit, 85
  for 2-bit). The codes are still ggml's; only the offset is rounded, by at most ``a / (2k)``.
  Every converted tensor records its largest deviation from the GGUF values.
* **codebook i-quants** (IQ1_S ... IQ3_S: sub-block scale times a codebook value and a sign) map
  exactly to 8 bits: each weight's signed value (an integer up to 62; for IQ1, eighths: -9..9 with
  the scale divided by 8) + 128, with the sub-block (16 or 32 weights) as the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgequant.ggml_iquants import CodebookGrid
from edgequant.ggml_quants import get_type
from edgequant.ort_quants import pack_codes, pack_zero_points, unpack_codes

F32 = np.float32


@dataclass
class BlockQuantized:
    """One weight matrix (rows = output features) in ORT's blockwise layout."""

    ggml_type: str
    bits: int
    block_size: int
    packed: np.ndarray  # (rows, cols * bits / 8) uint8: unsigned codes, packed little-end first
    scales: np.ndarray  # (rows, cols // block_size) float32
    zero_points: np.ndarray | None  # (rows, cols // block_size) uint8, None = 2**(bits-1)
    max_abs_error: float  # largest |ORT value - GGUF value| over the tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 8 // self.bits

    @property
    def codes(self) -> np.ndarray:
        """The unsigned codes, unpacked: (rows, cols)."""
        return unpack_codes(self.packed, self.bits)

    def dequantize(self) -> np.ndarray:
        """The float32 matrix ORT computes with (at accuracy_level 0)."""
        rows, cols = self.shape
        zp = self.zero_points if self.zero_points is not None else np.full(self.scales.shape, 1 << (self.bits - 1))
        blocks = self.codes.reshape(rows, -1, self.block_size).astype(F32) - zp[..., None].astype(F32)
        return (blocks * self.scales[..., None]).reshape(rows, cols)

    def stored_zero_points(self) -> np.ndarray | None:
        """The zero points as ORT stores them: ``bits`` each, packed like the codes, a row padded to a byte."""
        return None if self.zero_points is None else pack_zero_points(self.zero_points, self.bits)

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.stored_zero_points().nbytes
        return self.packed.nbytes + self.scales.nbytes + zp


ROW_CHUNK_WEIGHTS = 1 << 20  # a tensor is converted this many weights at a time (its codes, unpacked, are int64)


def from_ggml(ggml_type: str, data: np.ndarray) -> BlockQuantized:
    """Convert one GGUF tensor (bytes, shape (rows, row_bytes)) to ORT's blockwise form, a few
    rows at a time (whole, a 151936-row embedding's temporaries took several GB)."""
    qtype = get_type(ggml_type)
    step = max(1, ROW_CHUNK_WEIGHTS // (data.shape[1] // qtype.nbytes * qtype.block))
    parts = [_from_ggml_rows(ggml_type, data[r : r + step]) for r in range(0, len(data), step)]
    first = parts[0]
    zero_points = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])
    return BlockQuantized(ggml_type, first.bits, first.block_size, np.concatenate([p.packed for p in parts]),
                          np.concatenate([p.scales for p in parts]), zero_points,
                          max(p.max_abs_error for p in parts))


def from_ort(name: str, data: np.ndarray) -> BlockQuantized:
    """A tensor already in an ONNX Runtime configuration (:mod:`edgequant.ort_quants`): its row
    bytes split into codes, scales and zero points (exact: nothing is converted)."""
    qtype = get_type(name)
    return BlockQuantized(qtype.name, qtype.bits, qtype.block, *qtype.fields(data), 0.0)


def _from_ggml_rows(ggml_type: str, data: np.ndarray) -> BlockQuantized:
    qtype = get_type(ggml_type)
    grid, q = qtype.unpack(data)
    gguf_values = grid.values(q)
    if isinstance(grid, CodebookGrid):  # scale times a signed integer up to 62: 8 bits, exact
        integers, scale = grid.integers(q)
        out = BlockQuantized(ggml_type, 8, grid.sub, pack_codes(integers + 128, 8), scale, None, 0.0)
    elif qtype.levels is not None or qtype.qmin < 0:
        signed = qtype.levels[q].astype(np.int32) if qtype.levels is not None else q
        low, high = (qtype.levels.min(), qtype.levels.max()) if qtype.levels is not None else (qtype.qmin, qtype.qmax)
        bits = 4 if -8 <= low and high <= 7 else 8
        out = BlockQuantized(ggml_type, bits, grid.sub, pack_codes(signed + (1 << (bits - 1)), bits),
                             grid.scale.astype(F32), None, 0.0)
    else:
        out = _affine_to_8bit(ggml_type, grid, q)
    out.max_abs_error = float(np.abs(out.dequantize() - gguf_values).max())
    return out


def _affine_to_8bit(ggml_type: str, grid, q: np.ndarray) -> BlockQuantized:
    """``a * q + offset`` (q in 0..qmax) as ``(a / k) * (k * q + z0 - zp)`` with 8-bit codes."""
    a, off = grid.scale.astype(np.float64), grid.offset.astype(np.float64)
    k = np.zeros(a.shape, np.int64)
    t = np.zeros(a.shape, np.int64)
    z0 = np.zeros(a.shape, np.int64)
    for kk in range(255 // grid.qmax, 0, -1):  # the largest k whose codes and zero point fit in a byte
        with np.errstate(divide="ignore", invalid="ignore"):
            tk = np.rint(np.where(a != 0, -off * kk / a, 0)).astype(np.int64)
        zk = np.maximum(0, -tk)
        ok = (k == 0) & (zk + kk * grid.qmax <= 255) & (zk + tk <= 255)
        k[ok], t[ok], z0[ok] = kk, tk[ok], zk[ok]
    if (k == 0).any():  # offsets beyond 255 steps: not produced by ggml's encoders
        raise ValueError(f"{ggml_type}: a block's offset does not fit an 8-bit zero point")
    scale = (a / k).astype(F32)
    zp = z0 + t
    flat = a == 0  # constant blocks: value = offset, written as -offset * (0 - 1)
    scale[flat], zp[flat], z0[flat] = (-off[flat]).astype(F32), 1, 0
    codes = np.repeat(k, grid.sub, axis=1) * q + np.repeat(z0, grid.sub, axis=1)
    return BlockQuantized(ggml_type, 8, grid.sub, pack_codes(codes, 8), scale, zp.astype(np.uint8), 0.0)
