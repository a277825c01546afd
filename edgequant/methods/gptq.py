"""GPTQ onto exact ggml grids.

For each matrix, the ggml grid (block scales and mins) is chosen first from the weights and the
calibration importance, exactly as RTN does; GPTQ then picks the integer codes on that fixed
grid column by column, in order of decreasing activation energy ("act-order"), and spreads each
column's rounding error over the columns not yet quantized through the inverse Hessian of the
layer's inputs (dampened by 1% of its mean diagonal). The codes are the ones packed: nothing is
rounded again.

Blocks are calibrated in order, one at a time (``calibration.sequential_hessians``): each block
sees the outputs of the blocks before it *after* they were quantized. A block holds its rounded
weights only while the calibration stream passes it; then its own are put back, so the model
is left as it was, and no second copy of it is ever made. An untied output head is
done last, from the final hidden states. The input embedding is not a matmul, so it gets RTN;
so does a tied embedding/output matrix, whose rounding must serve both uses (GPTQ on the
output side alone made the Q3_K file worse here: KLD 0.289 vs RTN's 0.280).

8-bit matrices (Q8_0, and ONNX Runtime's 8-bit configurations) are rounded to nearest too: their rounding error is too small for error
feedback to matter. On the default model at Q8_0 everywhere, with QuBLAST's maps, GPTQ measured
KLD 0.00189 ± 0.00005 and round-to-nearest 0.00195 ± 0.00004 (llama.cpp, 8176 tokens), and GPTQ
tripled the build's time. A plan with nothing below 8 bits skips the Hessians altogether.

The codebook i-quants (IQ1_S ... IQ3_S) choose a vector for a group of 4 or 8 weights, not a
code per weight. For them the loop goes 8 columns (one sign byte; 32 for IQ1_S, whose shift is
shared by 32 weights) at a time: the vectors and signs of those columns are chosen together, each
column's error weighted by 1 / U_jj^2 (what rounding it costs once the columns after it are
corrected), then those columns' errors are spread over the columns after them as above. Act-order moves whole units (by their summed activation
energy): on the test layer of ``tests/test_gptq.py`` that took the output error from 0.82x to
0.44-0.54x importance-weighted nearest rounding's.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..calibration import BlockHessians, Calibration, sequential_hessians
from ..codestore import CodeStore
from ..ggml_iquants import Codes, CodebookGrid
from ..ggml_quants import EncodedTensor, Grid, QuantType, get_type
from ..ort_quants import TYPES as ORT_TYPES
from ..models import LoadedModel
from ..planning import Plan
from . import rtn

DAMP = 0.01
COLUMN_BLOCK = 128
ROUNDED_TO_NEAREST = {"Q8_0", *(name for name, t in ORT_TYPES.items() if t.bits == 8)}  # left to RTN (see above)
ROW_CHUNK_ELEMENTS = 1 << 24  # rows are rounded this many weights at a time (a block's matrices in one go)


def quantize(
    loaded: LoadedModel,
    plan: Plan,
    calibration: Calibration,
    progress: Callable[[str], None] | None = None,
) -> CodeStore:
    if all(t in ROUNDED_TO_NEAREST for t in plan.types.values()):
        return rtn.quantize(loaded, plan, calibration, progress)
    encoded = CodeStore()

    def round_block(block: BlockHessians) -> dict[str, torch.Tensor]:
        """The block's matrices rounded (their codes spilled to ``encoded``), as weights."""
        weights = {}
        for name, hessian in block.hessians.items():
            if name == "token_embd.weight":
                continue
            weight = block.linears[name].weight.detach()
            qtype = get_type(plan.types[name])
            rounding = nearest if qtype.name in ROUNDED_TO_NEAREST else gptq_rows
            packed = np.empty((weight.shape[0], qtype.row_bytes(weight.shape[1])), np.uint8)
            values = torch.empty_like(weight) if block.index >= 0 else None  # the calibration stream goes on through them
            for rows, codes, grid in rounding(weight, hessian, qtype):
                packed[rows] = qtype.pack(grid, codes)
                if values is not None:
                    values[rows] = torch.from_numpy(grid.values(codes))
            encoded[name] = EncodedTensor(qtype.name, packed)
            if values is not None:
                weights[name] = values
            if progress:
                progress(name)
        return weights

    for _ in sequential_hessians(loaded, calibration.windows, round_block):
        pass
    for name, weight in loaded.matrices():
        if name not in encoded:
            encoded[name] = rtn.encode(name, weight, plan, calibration, progress)
    return encoded


def gptq(weight: torch.Tensor, hessian: torch.Tensor, qtype: QuantType, act_order: bool = True):
    """Codes (rows, cols) and the grid they live on, for ``weight`` given its input Hessian."""
    parts = list(gptq_rows(weight, hessian, qtype, act_order))
    codes, grids = [c for _, c, _ in parts], [g for _, _, g in parts]
    return grids[0].codes_of_rows(codes), grids[0].of_rows(grids)


@torch.no_grad()
def gptq_rows(weight: torch.Tensor, hessian: torch.Tensor, qtype: QuantType, act_order: bool = True):
    """:func:`gptq` a range of rows at a time: yields (row slice, its codes, its grid).

    Rows share the Hessian but not their errors, so each range is rounded on its own and a
    151936-row output head never has more than a range's copies and codes in memory."""
    cols = hessian.shape[0]
    diag = torch.diag(hessian).clone()
    dead = diag == 0  # inputs never seen: their columns are zeroed, their Hessian diagonal set to 1
    diag[dead] = 1.0
    grouped = qtype.joint_columns > 1  # codes chosen several columns at once: act-order moves whole units
    if not act_order:
        perm = torch.arange(cols)
    elif grouped:
        unit = qtype.joint_columns
        units = torch.argsort(diag.reshape(-1, unit).sum(1), descending=True)
        perm = (units[:, None] * unit + torch.arange(unit)).reshape(-1)
    else:
        perm = torch.argsort(diag, descending=True)
    U = _inverse_cholesky_reversed(hessian, diag, perm.flip(0))
    importance = diag.float().numpy()
    for rows in _row_ranges(weight):
        w = weight[rows].float()
        grid = qtype.fit((w * ~dead if dead.any() else w).numpy(), importance=importance)
        yield rows, (_rounded_groups if grouped else _rounded_columns)(w, grid, U, perm, dead), grid


def _row_ranges(weight: torch.Tensor) -> list[slice]:
    rows, cols = weight.shape
    step = max(1, ROW_CHUNK_ELEMENTS // cols)
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def _rounded_columns(weight: torch.Tensor, grid: Grid, U: torch.Tensor, perm: torch.Tensor, dead: torch.Tensor) -> np.ndarray:
    """GPTQ's column loop on ``grid``: each column in ``perm``'s order rounded, its error spread
    over the columns after it through ``U`` (the upper factor of the inverse Hessian)."""
    cols = len(perm)
    W = weight[:, perm]  # a copy
    W[:, dead[perm]] = 0.0
    codes = np.zeros(W.shape, np.int32)
    for i1 in range(0, cols, COLUMN_BLOCK):
        i2 = min(i1 + COLUMN_BLOCK, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        rounding = _ColumnRounding(grid, perm[i1:i2].numpy())
        for i in range(i2 - i1):
            q, value = rounding(i, W1[:, i])
            codes[:, rounding.columns[i]] = q
            err = (W1[:, i] - value) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes


def _rounded_groups(weight: torch.Tensor, grid: CodebookGrid, U: torch.Tensor, perm: torch.Tensor, dead: torch.Tensor) -> Codes:
    """GPTQ's loop for a codebook type, its ``joint_columns`` at a time in ``perm``'s order of whole
    units (see the module's text)."""
    W = weight[:, perm]  # a copy
    W[:, dead[perm]] = 0.0
    rows, cols = W.shape
    group, unit = grid.qtype.codebook.group, grid.qtype.joint_columns
    index, signs = np.zeros((rows, cols // group), np.int32), np.zeros((rows, cols // 8), np.uint8)
    metric = (1.0 / U.diagonal() ** 2).numpy()
    for i1 in range(0, cols, COLUMN_BLOCK):
        i2 = min(i1 + COLUMN_BLOCK, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for j in range(0, i2 - i1, unit):
            c = int(perm[i1 + j])  # the unit's first column in the matrix
            codes = grid.round(W1[:, j : j + unit].numpy(), c, importance=metric[i1 + j : i1 + j + unit])
            index[:, c // group : (c + unit) // group], signs[:, c // 8 : (c + unit) // 8] = codes.index, codes.signs
            value = torch.from_numpy(grid.values(codes, c))
            for k in range(j, j + unit):
                err = (W1[:, k] - value[:, k - j]) / U1[k, k]
                W1[:, k:] -= err[:, None] * U1[k, k:][None, :]
                E1[:, k] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Codes(index, signs)


def _inverse_cholesky_reversed(hessian: torch.Tensor, diag: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
    """For H = J A J, A the dampened Hessian in act-order (``reverse`` is that order reversed,
    ``diag`` the diagonal to use) and J the reversal: the upper triangular U with U^T U = A^-1
    (float32), which GPTQ's updates read. From one Cholesky factorization and one triangular
    inverse: H = L L^T makes A = R R^T with R = J L J upper, so A^-1 = (R^-1)^T R^-1 and
    U = R^-1 = J L^-1 J. (The usual route, A's factor inverted whole and factored again, took
    14 s instead of 5 for an 8960-wide Hessian.) H is gathered, factored and inverted in one
    float64 array, in place: for that Hessian, 0.64 GB instead of 2.6 GB of copies."""
    from scipy.linalg.lapack import dpotrf, dtrtri

    n = len(reverse)
    H = torch.empty((n, n), dtype=torch.float64)
    for r in range(0, n, 1024):  # gathered in float32 a band at a time (in float64 it took seconds)
        H[r : r + 1024] = hessian[reverse[r : r + 1024]][:, reverse]
    H.diagonal().copy_(diag[reverse].double() + DAMP * diag.double().mean())
    # H is symmetric, so its transpose is the same matrix in the column-major order LAPACK works in place on
    L, info = dpotrf(H.numpy().T, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the dampened Hessian is not positive definite (LAPACK potrf info {info})")
    inverse, info = dtrtri(L, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the Hessian's factor is singular (LAPACK trtri info {info})")
    # L^-1 is column-major: read as row-major it is its transpose, and U^T = J (L^-1)^T J a reversed copy of it
    return torch.from_numpy(np.ascontiguousarray(inverse.T[::-1, ::-1], dtype=np.float32)).T


@torch.no_grad()
def nearest(weight: torch.Tensor, hessian: torch.Tensor, qtype: QuantType):
    """Round-to-nearest, the grid fitted with the Hessian's diagonal as importance, a range of
    rows at a time as :func:`gptq_rows` yields them."""
    importance = torch.diag(hessian).float().numpy()
    for rows in _row_ranges(weight):
        w = weight[rows].float().numpy()
        grid = qtype.fit(w, importance=importance)
        yield rows, grid.round(w), grid


class _ColumnRounding:
    """Round-to-nearest on ``grid``, one of ``columns`` at a time, in torch, their scales and
    offsets gathered once (through the grid's own numpy methods, a column cost 0.3 ms: 5 s a
    block on Qwen2.5-1.5B). The same arithmetic as :meth:`Grid.round` and :meth:`Grid.values`."""

    def __init__(self, grid: Grid, columns: np.ndarray):
        self.grid, self.columns = grid, columns
        self.scale = torch.from_numpy(grid.scale[:, columns // grid.sub])
        self.offset = torch.from_numpy(grid.offset[:, columns // grid.sub])

    def __call__(self, i: int, w: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """The codes of column ``columns[i]``, whose weights are now ``w``, and their values."""
        if self.grid.levels is not None:  # a codebook (IQ4_NL): the grid's own nearest level
            q = self.grid.round(w.numpy()[:, None], int(self.columns[i]))
            return q[:, 0], torch.from_numpy(self.grid.values(q, int(self.columns[i]))[:, 0])
        scale, offset = self.scale[:, i], self.offset[:, i]
        q = torch.where(scale != 0, (w - offset) / scale, 0).round_().clamp_(self.grid.qmin, self.grid.qmax)
        return q.to(torch.int32).numpy(), scale * q + offset
