"""GPU neighbour lists for the graph build without a score matrix in memory: a Triton kernel that scores tiles of
rows against tiles of columns and keeps, for each row, only the two largest scores of every CH-column chunk.

Contract (all on one device; the kernel runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1):
  left   (G, r, D) float16   one row per query (or key) whose list is wanted
  right  (G, c, D) float16   the columns, in the chunked order below; c a multiple of BN
  bias   (G, c)    float32   added to every score of a column (-|x_j|^2 for L2 lists, 0 for inner products,
                             -inf for padding columns)
  self_col (G, r)  int32     optional: the column each row must not score (itself), -1 for none
-> vals (G, r, 2 * c / CH) float32 and cols (G, r, 2 * c / CH) int32: per chunk its largest and second largest
   score (first the c / CH largest, then the c / CH second largest) and their columns.

Why: the key-to-key lists of an 8B layer at 128K tokens are a 8 x 130K x 130K score matrix (272 GB in float16);
writing it and reading it back for chunk maxima took three times the matmul itself (RESULTS.md, twelfth session).
Here the scores never leave the multiprocessor. A true top-k entry of a row is missed only where three entries of
higher approximate score share its chunk; columns are dealt to chunks round-robin (chunk j holds columns j,
j + c/CH, j + 2c/CH, ...), so neighbouring tokens, whose keys are often alike, fall into different chunks.
"""
import contextlib
import os

import torch

BM, BN, CH = 128, 128, 32  # row tile, column tile, chunk (columns per kept pair)
TILES_PER_PROGRAM = 16  # column tiles one program scores: enough programs to fill the GPU, one row tile load each

_kernel = None


def available(device: torch.device) -> bool:
    """Whether the kernel can run for tensors on `device` (Triton installed; a CUDA device, or the interpreter)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _get_kernel():
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_top2(left, right, bias, self_col, vals, cols, n_rows, n_cols, tiles_per_prog,
                   s_lg, s_lr, s_rg, s_rc, s_bg, s_sg, s_vg, s_vr,
                   HAS_SELF: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        g = tl.program_id(2)
        rows = pid_r * BM + tl.arange(0, BM)
        row_ok = rows < n_rows
        dims = tl.arange(0, D)
        a = tl.load(left + g * s_lg + rows[:, None] * s_lr + dims[None, :], mask=row_ok[:, None], other=0.0)
        if HAS_SELF:
            own = tl.load(self_col + g * s_sg + rows, mask=row_ok, other=-1)
        NC: tl.constexpr = BN // CH
        half = n_cols // CH  # where the second-largest half of a row's output starts
        lane = tl.arange(0, CH)
        for t in range(0, tiles_per_prog):
            c0 = (pid_c * tiles_per_prog + t) * BN
            if c0 < n_cols:
                cidx = c0 + tl.arange(0, BN)
                b = tl.load(right + g * s_rg + cidx[:, None] * s_rc + dims[None, :])
                s = tl.dot(a, tl.trans(b)) + tl.load(bias + g * s_bg + cidx)[None, :]
                if HAS_SELF:
                    s = tl.where(cidx[None, :] == own[:, None], float("-inf"), s)
                x = tl.reshape(s, (BM, NC, CH))
                m1 = tl.max(x, axis=2)
                a1 = tl.argmax(x, axis=2)
                x = tl.where(lane[None, None, :] == a1[:, :, None], float("-inf"), x)
                m2 = tl.max(x, axis=2)
                a2 = tl.argmax(x, axis=2)
                first = c0 + tl.arange(0, NC) * CH  # each chunk's first column
                chunk = c0 // CH + tl.arange(0, NC)
                out = g * s_vg + rows[:, None] * s_vr + chunk[None, :]
                tl.store(vals + out, m1, mask=row_ok[:, None])
                tl.store(vals + out + half, m2, mask=row_ok[:, None])
                tl.store(cols + out, (first[None, :] + a1).to(tl.int32), mask=row_ok[:, None])
                tl.store(cols + out + half, (first[None, :] + a2).to(tl.int32), mask=row_ok[:, None])

    _kernel = chunk_top2
    return _kernel


def column_order(n: int, device) -> tuple[torch.Tensor, int]:
    """(perm, c): c = n padded to whole column tiles; perm[p] is the original column (>= n: padding) at position p.
    Chunk j (positions j*CH .. j*CH+CH-1) holds original columns j, j + c/CH, j + 2c/CH, ..."""
    c = -(-n // BN) * BN
    perm = torch.arange(c, device=device).view(CH, c // CH).t().reshape(-1)
    return perm, c


def chunk_top2(left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor, self_col: torch.Tensor | None = None):
    """The kernel over all rows of `left` (module docstring for shapes); returns (vals, cols)."""
    G, r, D = left.shape
    c = right.shape[1]
    assert left.dtype == right.dtype == torch.float16 and bias.dtype == torch.float32 and c % BN == 0
    assert D >= 16 and D & (D - 1) == 0, "feature dim padded to a power of two >= 16"
    left, right, bias = left.contiguous(), right.contiguous(), bias.contiguous()
    vals = torch.empty((G, r, 2 * (c // CH)), dtype=torch.float32, device=left.device)
    cols = torch.empty((G, r, 2 * (c // CH)), dtype=torch.int32, device=left.device)
    has_self = self_col is not None
    own = self_col.to(torch.int32).contiguous() if has_self else torch.empty((G, 1), dtype=torch.int32, device=left.device)
    tiles = c // BN
    per_prog = min(TILES_PER_PROGRAM, tiles)
    grid = (-(-r // BM), -(-tiles // per_prog), G)
    kernel = _get_kernel()
    with torch.cuda.device(left.device) if left.is_cuda else contextlib.nullcontext():
        kernel[grid](left, right, bias, own, vals, cols, r, c, per_prog,
                     left.stride(0), left.stride(1), right.stride(0), right.stride(1), bias.stride(0), own.stride(0),
                     vals.stride(0), vals.stride(1),
                     HAS_SELF=has_self, D=D, BM=BM, BN=BN, CH=CH, num_warps=8, num_stages=3)
    return vals, cols


def padded_dim(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())
