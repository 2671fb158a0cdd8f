"""How one batch becomes a Gram matrix: the centred copy, its workspace, and the products.

The accumulator (:mod:`delve.covariance`) hands a batch of rows, a shift close to their
mean and a power-of-two scale to :func:`centred_gram`, which returns the Gram matrix and
the column sums of ``(x - shift) * scale``:

* the rows are centred (and scaled) while they are copied once into a reused workspace,
  in the layout the product wants; that one copy also turns a channels-first feature map
  into rows without a separate reshape. Subtracting a shift close to the data is exact in
  floating point (Sterbenz), and so is scaling by a power of two, so the float32 products
  keep their digits even when ``|mean|`` is ``10⁴·std`` and do not overflow when the
  activations are around ``1e18``;
* the products run over blocks of at most ``max(8192, features)`` rows whose float32
  results are summed in float64, so rounding does not grow with the batch;
* three ways of computing them give the same digits: ``"full"``, one product per row
  block; ``"triangle"``, only the lower block triangle of the symmetric result (up to
  half the multiply-adds, in more and narrower calls); and ``"streamed"``, which copies
  and multiplies one row block at a time, so the product reads the copy from the cache
  (for batches of more than one block). Which is fastest depends on the CPU (the
  triangle wins where a large product runs at a low rate, the full product where it
  runs at full speed, streaming where memory is slow next to the arithmetic), so
  :data:`PRODUCTS` times them on the first batches of each shape and keeps the fastest
  (see :mod:`delve.autotune`); ``DELVE_GRAM_PRODUCT=full``, ``triangle`` or
  ``streamed`` forces one.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Dict, Optional, Tuple

import torch

from delve.autotune import Autotuner, Decision

__all__ = [
    "BLOCKWISE_FEATURES",
    "PRODUCTS",
    "block_bounds",
    "centred_gram",
    "first_shift",
    "host_value",
    "power_of_two_scale",
    "product_decision",
    "product_signature",
    "release_workspace",
    "workspace_bytes",
]

# A float32 Gram product accumulates each entry over the rows in order; over many rows
# its rounding grows past what SPEC §4 allows, so products are taken over row blocks
# of this size (or the feature count, whichever is larger) and summed in float64.
_BLOCK_ROWS = 8192
# Rows a new epoch's first shift is estimated from.
_SHIFT_SAMPLE_ROWS = 4096
#: From this many features on, a batch's Gram blocks are added to the state one by one
#: (two passes over features² values cost as much as a sizeable part of the product), so
#: the blocks above the diagonal are left undefined.
BLOCKWISE_FEATURES = 512
# Below this many multiply-adds (rows × features²) the triangle is not worth timing:
# its extra calls cost more than the multiply-adds they save.
_MIN_TRIANGLE_WORK = 2**22
# Feature rows of the feature-major copy lie this many elements more apart than their
# length when that is a multiple of it: rows a power of two apart share cache sets, and
# the product's reads of them evict each other.
_STRIDE_PAD = 16
# A workspace larger than this is not kept between batches.
_MAX_KEPT_WORKSPACE = 512 * 2**20
# Scales stay within float32's exponent range with room for a product of two.
_MAX_SCALE_EXPONENT = 60

_local = threading.local()
# Every thread's buffers, so that close() can free them all; a thread that ends takes its own along.
_all_buffers: weakref.WeakKeyDictionary[threading.Thread, Dict[torch.dtype, torch.Tensor]] = weakref.WeakKeyDictionary()
_buffers_lock = threading.Lock()

#: Chooses each batch shape's product by timing the candidates on its first batches (three
#: calls each: on a shared machine the best of two was seen to pick a product 20 % slower).
PRODUCTS = Autotuner("Gram product", ("full", "triangle", "streamed"), env="DELVE_GRAM_PRODUCT", trials=3)


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Return a flat scratch tensor of ``numel`` elements.

    On the CPU the buffer is kept (per thread and dtype) and reused by every accumulator,
    so a training step does not fault in fresh pages for each layer's centred copy. GPU
    allocators already pool their memory.
    """
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffers = _local.__dict__.get("buffers")
    if buffers is None:
        buffers = _local.buffers = {}
        with _buffers_lock:
            _all_buffers[threading.current_thread()] = buffers
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype)
        if numel * buffer.element_size() <= _MAX_KEPT_WORKSPACE:
            buffers[dtype] = buffer
        else:
            buffers.pop(dtype, None)
    return buffer[:numel]


def workspace_bytes() -> int:
    """Return the bytes of CPU workspace kept for centred batch copies, over all threads."""
    with _buffers_lock:
        return sum(b.numel() * b.element_size() for buffers in _all_buffers.values() for b in buffers.values())


def release_workspace() -> None:
    """Free the CPU workspace of every thread (it is allocated again by the next batch)."""
    with _buffers_lock:
        for buffers in _all_buffers.values():
            buffers.clear()


@functools.cache
def block_bounds(features: int) -> Tuple[int, ...]:
    """Split the features into the blocks whose lower block triangle the Gram product computes.

    A Gram matrix is symmetric: computing block row ``i`` only up to its diagonal block
    skips up to half of the multiply-adds (0.75 of them with two blocks, 0.56 with
    eight). Blocks stay wide enough (16 features or more, on multiples of 8) for each
    product to run near full speed.
    """
    if features < 32:
        return (0, features)
    parts = 2 if features < 64 else 4 if features < 512 else 8
    inner = sorted({8 * round(i * features / parts / 8) for i in range(1, parts)} - {0, features})
    return (0, *inner, features)


def host_value(value: torch.Tensor) -> Optional[float]:
    """Return a 0-d tensor as a Python number where reading it costs no synchronisation (the CPU), else ``None``."""
    return value.item() if value.device.type == "cpu" else None


def _centred_copy(x: torch.Tensor, shift: torch.Tensor, scale: Optional[torch.Tensor], out: torch.Tensor) -> None:
    if scale is None:
        torch.sub(x, shift, out=out)
        return
    # x·c − s·c rounds exactly as (x − s)·c for a power-of-two c: one pass, no overflow.
    # A Python factor runs at the speed of a subtraction; a tensor one (through addcmul)
    # at about half of it, but reading it would make a GPU wait.
    factor = host_value(scale)
    if factor is None:
        torch.addcmul(shift * -scale, x, scale, out=out)
    else:
        torch.add(shift * -factor, x, alpha=factor, out=out)


def product_signature(x: torch.Tensor, work: torch.dtype) -> Tuple:
    """Return what the speed of a batch's products depends on: rows, features, layout, dtype, device.

    The rows are rounded up to a power of two so that batches of sequences of every length
    share a few signatures instead of timing each length anew.
    """
    features = x.shape[-1]
    rows = x.numel() // max(features, 1)
    layout = "rows" if x.stride(-1) == 1 or features == 1 else "features"
    return (1 << max(rows - 1, 0).bit_length(), features, layout, str(work).replace("torch.", ""), x.device.type)


def product_decision(signature: Tuple) -> Optional[Decision]:
    """Return the product a signature uses and why (``None`` while its candidates are still timed)."""
    return PRODUCTS.decision(signature)


def centred_gram(
    x: torch.Tensor,
    shift: torch.Tensor,
    work: torch.dtype,
    bounds: Tuple[int, ...],
    scale: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the Gram matrix and the column sums of the rows of ``x`` centred on ``shift`` (and scaled).

    Parameters
    ----------
    x : torch.Tensor
        Shape ``(..., features)``: every index of the leading dimensions is a row.
    shift : torch.Tensor
        ``(features,)`` in ``work``, subtracted from every row.
    work : torch.dtype
        The dtype of the centred copy and the products.
    bounds : tuple of int
        The feature blocks (:func:`block_bounds`) of the ``"triangle"`` product. When it
        is used, the blocks above the lower block triangle are zero, or undefined from
        :data:`BLOCKWISE_FEATURES` features on.
    scale : torch.Tensor, optional
        A power of two the centred rows are multiplied by (0-d, in ``work``).
    valid : torch.Tensor, optional
        Boolean, of shape ``x.shape[:-1]``: the rows where it is false are zeroed in the
        centred copy, so they add nothing to either result.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        The Gram matrix and the ``(features,)`` column sums: float64 when they were
        summed over row blocks (the Gram matrix) or streamed (both), else ``work``.

    """
    features = x.shape[-1]
    rows = x.numel() // features
    allowed = ["full"]
    if len(bounds) > 2 and rows * features * features >= _MIN_TRIANGLE_WORK:
        allowed.append("triangle")
    if _block_rows(rows, features, work) < rows and x.dim() > 1 and x.shape[0] > 1:
        allowed.append("streamed")
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def product(name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if name == "streamed":
            return _streamed(x, shift, work, scale, valid)
        chunks, sums = _centred_chunks(x, shift, work, scale, valid)
        return (_triangle(chunks, bounds) if name == "triangle" else _full(chunks)), sums

    return PRODUCTS.run(product_signature(x, work), tuple(allowed), product, sync)


def _block_rows(rows: int, features: int, work: torch.dtype) -> int:
    # Row blocks only serve float32 rounding; at least `features` rows each keeps their
    # results (blocks × features²) no larger than the centred copy.
    return rows if work == torch.float64 else max(_BLOCK_ROWS, features)


def _streamed(
    x: torch.Tensor,
    shift: torch.Tensor,
    work: torch.dtype,
    scale: Optional[torch.Tensor],
    valid: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Copy and multiply one row block at a time, along the first dimension, while the copy is in cache."""
    features = x.shape[-1]
    per_index = x[0].numel() // features  # rows per index of the first dimension
    step = max(1, _block_rows(x.numel() // features, features, work) // per_index)
    gram = torch.zeros(features, features, dtype=torch.float64, device=x.device)
    sums = torch.zeros(features, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], step):
        part = None if valid is None else valid[start : start + step]
        chunks, part_sums = _centred_chunks(x[start : start + step], shift, work, scale, part)
        gram.add_(_full(chunks))
        sums.add_(part_sums)
    return gram, sums


def _centred_chunks(
    x: torch.Tensor,
    shift: torch.Tensor,
    work: torch.dtype,
    scale: Optional[torch.Tensor],
    valid: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Copy the centred rows into the workspace; return them as ``(blocks, features, rows)`` and their column sums."""
    features = x.shape[-1]
    rows = x.numel() // features
    blocks = -(-rows // _block_rows(rows, features, work))
    per_block = -(-rows // blocks)
    padded = blocks * per_block  # the zero rows that pad the last block change no sum
    if x.stride(-1) == 1 or features == 1:
        buffer = _workspace(features * padded, work, x.device)
        # Features adjacent in memory: the centred copy is row-major (rows, features).
        flat = buffer.view(padded, features)
        _centred_copy(x, shift, scale, flat[:rows].view(x.shape))
        if valid is not None:
            flat[:rows].masked_fill_(~valid.reshape(rows, 1), 0.0)
        if padded > rows:
            flat[rows:].zero_()
        return flat.view(blocks, per_block, features).transpose(1, 2), flat.sum(0)
    # Features strided (a channels-first map seen as rows): write the centred copy
    # feature-major, (features, rows), reading the input in its own memory order.
    stride = padded + _STRIDE_PAD if padded % _STRIDE_PAD == 0 else padded
    flat = _workspace(features * stride, work, x.device).view(features, stride)[:, :padded]
    lead = x.shape[:-1]
    out = flat[:, :rows].view(features, *lead)
    broadcast = (features,) + (1,) * len(lead)
    _centred_copy(x.movedim(-1, 0), shift.view(broadcast), scale, out)
    if valid is not None:
        out.masked_fill_(~valid.unsqueeze(0), 0.0)
    if padded > rows:
        flat[:, rows:].zero_()
    return flat.view(features, blocks, per_block).transpose(0, 1), flat.sum(1)


def _full(chunks: torch.Tensor) -> torch.Tensor:
    """One full product per row block (BLAS reads either layout of ``chunks``), summed in float64."""
    if chunks.shape[0] == 1:
        return chunks[0] @ chunks[0].T
    features = chunks.shape[1]
    gram = torch.zeros(features, features, dtype=torch.float64, device=chunks.device)
    part = torch.empty(features, features, dtype=chunks.dtype, device=chunks.device)
    for chunk in chunks:
        gram.add_(torch.mm(chunk, chunk.T, out=part))
    return gram


def _triangle(chunks: torch.Tensor, bounds: Tuple[int, ...]) -> torch.Tensor:
    """Compute the lower block triangle only, each block row over all row blocks at once."""
    blocks, features = chunks.shape[0], chunks.shape[1]
    dtype = chunks.dtype if blocks == 1 else torch.float64
    new = torch.empty if features >= BLOCKWISE_FEATURES else torch.zeros
    gram = new(features, features, dtype=dtype, device=chunks.device)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        part = gram[start:stop, :stop]
        if blocks == 1:
            torch.mm(chunks[0, start:stop], chunks[0, :stop].T, out=part)
        else:
            torch.sum(torch.bmm(chunks[:, start:stop], chunks[:, :stop].transpose(1, 2)), 0, dtype=dtype, out=part)
    return gram


def first_shift(
    x: torch.Tensor, work: torch.dtype, valid: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Estimate the mean and the spread of a batch's rows from its leading samples (about 4096 rows).

    A shift only has to be near the data, within a few standard deviations, for the
    centred float32 products to keep their digits. Non-finite values are left out, so
    that a first batch with a NaN (which will be skipped) does not centre the next ones
    on zero; a feature with no finite value gets 0. So are the rows ``valid`` marks as
    padding.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        The ``(features,)`` shift in ``work`` and the largest ``|x - shift|`` of the
        sample (float64, 0-d), both on the device: no host synchronisation.

    """
    per_sample = max(1, x[0].numel() // x.shape[-1]) if x.shape[0] else 1
    sample = x[: -(-_SHIFT_SAMPLE_ROWS // per_sample)].detach()
    lead = tuple(range(sample.dim() - 1))
    finite = torch.isfinite(sample)
    if valid is not None:
        finite &= valid[: sample.shape[0]].unsqueeze(-1)
    total = torch.where(finite, sample, 0.0).sum(lead, dtype=torch.float64)
    count = finite.sum(lead)
    shift = torch.where(count > 0, total / count.clamp_min(1), 0.0).to(work)
    spread = torch.where(finite, (sample.to(torch.float64) - shift.to(torch.float64)).abs(), 0.0).amax()
    return shift, spread


def power_of_two_scale(spread: torch.Tensor, work: torch.dtype) -> Optional[torch.Tensor]:
    """Return the power of two that brings a spread of centred values near 1 (``None`` in float64).

    Centred float32 values of about ``1e18`` would overflow their products (a Gram entry
    sums thousands of squares); scaled by a power of two they neither overflow nor lose a
    bit. A zero or non-finite spread gives 1.
    """
    if work == torch.float64:
        return None
    exponent = torch.floor(torch.log2(spread.to(torch.float64)))
    exponent = torch.where(torch.isfinite(exponent), exponent, 0.0).clamp(-_MAX_SCALE_EXPONENT, _MAX_SCALE_EXPONENT)
    return torch.exp2(-exponent).to(work)
