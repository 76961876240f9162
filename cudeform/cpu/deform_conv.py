"""Deformable convolution on the CPU: Numba im2col / col2im kernels around NumPy matmuls.

The batch is processed a few images at a time (a chunk). Everything inside a chunk is
channels-last, so that the inner loops of the kernels run over contiguous channels, which
Numba vectorises, instead of gathering one value per sample:

- ``_pad`` copies the chunk's input into zero-bordered channels-last planes
  (images, (H+3)*(W+2), C_in): one row and column of zeros before the image, two rows and
  one column after it. The four neighbours of any sample inside the open box
  ``(-1, H) x (-1, W)`` are then valid pixels, zeros outside the image, so the loops have
  no bounds tests.
- ``_taps`` computes, once per (image, output position, offset group, kernel point), where
  the sample lands: the flat index of its top-left neighbour in the bordered plane, its
  fractions (lh, lw) and its mask. A sample outside the open box points at four zeros of
  the bottom border with mask 0. Every channel of the offset group reuses the tap.
- The columns are (images, H_out*W_out, C_in*kh*kw), a row's columns ordered (weight group,
  kernel point, channel), so that the weight, reordered to (groups, C_out/groups,
  kh*kw*C_in/groups), multiplies them in one batched matmul with a transposed operand.
  ``_im2col`` builds them; the backward rebuilds them for the weight gradient and scatters
  the columns' gradient back with ``_col2im`` (input) and ``_col2im_coord`` (offset, mask).

Parallel loops are split so that no two iterations write one element: ``_pad`` by (image,
bordered row), ``_taps`` by (image, output row), ``_im2col`` and ``_col2im_coord`` by
(image, block of output positions), each owning those positions' columns or offset/mask
gradients; ``_col2im`` by (image, block of _CHANNEL_BLOCK channels), each accumulating its
channels' input gradient in its own bordered plane and copying it out. The block sizes
never change what is summed or in which order, so results are bitwise reproducible run
after run and for any number of threads (``deterministic`` changes nothing on the CPU).
The input gradient sums each pixel's contributions in (output position, kernel point)
order; the offset and mask gradients sum each sample's channels in _LANES interleaved
partial sums (channel j of a run of channels in sum j % _LANES), then those in order.

Memory: a chunk holds as many images as keep each of its buffers within COLUMNS_BYTES (at
least one image). Per image, the buffers are the columns (C_in*kh*kw*H_out*W_out elements;
the backward has two, the columns and their gradient), the taps ((8 + 3 * itemsize)
bytes per offset group, kernel point and output position), the bordered input
(C_in*(H+3)*(W+2) elements) and, in the backward, the bordered input-gradient
accumulators (ceil(C_in/_CHANNEL_BLOCK)*_CHANNEL_BLOCK*(H+3)*(W+2) elements). So one call
holds at most 5 (forward: 3) such buffers of at most COLUMNS_BYTES each, plus its inputs
and outputs. The chunk buffers are kept per calling thread for its next call (so that
repeated calls reuse warm pages instead of faulting fresh ones in, which costs more than
the kernels on some machines) while that thread's kept buffers total at most
KEEP_SCRATCH_BYTES; the others are freed when the call returns. Set KEEP_SCRATCH_BYTES = 0
to keep nothing (later calls then free what was kept).
"""

from __future__ import annotations

import functools
import math
import threading

import numba
import numpy as np
from numba import njit, prange

from ._bilinear import in_open_box

# Upper bound of one per-chunk buffer (columns, taps, bordered input); a chunk holds as many
# images as fit (at least one).
COLUMNS_BYTES = 32 * 2**20

# Chunk buffers that one thread keeps for its next call, in bytes (0: keep nothing).
KEEP_SCRATCH_BYTES = 64 * 2**20

# Channels per _col2im task (its accumulator is (H+3)*(W+2) by this many channels).
_CHANNEL_BLOCK = 32

# Interleaved partial sums of the offset and mask gradients (one vector of float32).
_LANES = 16


@njit(parallel=True, cache=True)
def _pad(inp, n0, xc):
    """xc[n, (y+1)*(W+2) + x+1, c] = inp[n0+n, c, y, x]; zeros on the border."""
    images, size, channels = xc.shape
    height, width = inp.shape[2], inp.shape[3]
    wp = width + 2
    rows = size // wp
    for task in prange(images * rows):
        n = task // rows
        py = task % rows
        start = py * wp
        if 1 <= py <= height:
            for c in range(channels):
                xc[n, start, c] = 0.0
                xc[n, start + wp - 1, c] = 0.0
            for c in range(channels):
                for x in range(width):
                    xc[n, start + 1 + x, c] = inp[n0 + n, c, py - 1, x]
        else:
            for q in range(start, start + wp):
                for c in range(channels):
                    xc[n, q, c] = 0.0


@njit(parallel=True, cache=True)
def _taps(offset, mask, use_mask, n0, kh, kw, sh, sw, ph, pw, dh, dw, height, width,
          base, frac_h, frac_w, tap_mask):
    """Taps (images, L, G*K) of images n0..: flat index of the top-left neighbour in the
    bordered plane, fractions, and the mask (0 outside the open box)."""
    images, _, gks = base.shape
    out_h, out_w = offset.shape[2], offset.shape[3]
    k_size = kh * kw
    wp = width + 2
    outside = (height + 1) * wp  # four zeros of the bottom border
    for task in prange(images * out_h):
        n = task // out_h
        y = task % out_h
        for gk in range(gks):
            k = gk % k_size
            dy = offset[n0 + n, 2 * gk, y]
            dx = offset[n0 + n, 2 * gk + 1, y]
            hy = y * sh - ph + (k // kw) * dh
            wx = (k % kw) * dw - pw
            t_base = base[n, y * out_w:(y + 1) * out_w, gk]
            t_h = frac_h[n, y * out_w:(y + 1) * out_w, gk]
            t_w = frac_w[n, y * out_w:(y + 1) * out_w, gk]
            t_m = tap_mask[n, y * out_w:(y + 1) * out_w, gk]
            for x in range(out_w):
                h = hy + dy[x]
                w = x * sw + wx + dx[x]
                if in_open_box(h, w, height, width):
                    h0 = math.floor(h)
                    w0 = math.floor(w)
                    t_base[x] = (int(h0) + 1) * wp + int(w0) + 1
                    t_h[x] = h - h0
                    t_w[x] = w - w0
                    t_m[x] = mask[n0 + n, gk, y, x] if use_mask else 1.0
                else:
                    t_base[x] = outside
                    t_h[x] = 0.0
                    t_w[x] = 0.0
                    t_m[x] = 0.0


# The kernels below walk runs of channels that share their weight group and offset group
# (rows of a ``runs`` table: first channel, end, offset group, shift). Channel c, kernel
# point k of weight group gc sits in column gc*K*Cg + k*Cg + (c - gc*Cg) = shift + k*Cg + c
# of a row of the columns, with shift = gc*Cg*(K - 1). Inner loops index with unsigned
# integers, which need no negative-index wraparound, so that they vectorise.


@njit(cache=True)
def _im2col_positions(xc, wp, base, frac_h, frac_w, tap_mask, one, k_size, per_conv, runs, n, p0, p1, cols):
    """Columns of image n, positions p0..p1 (one task of _im2col; a plain function, so
    that Numba's parallel-loop passes leave its loops alone)."""
    for pos in range(p0, p1):
        for k in range(k_size):
            gk = -1
            for r in range(runs.shape[0]):
                if runs[r, 2] * k_size + k != gk:  # a new offset group: load its tap
                    gk = runs[r, 2] * k_size + k
                    p = base[n, pos, gk]
                    lh = frac_h[n, pos, gk]
                    lw = frac_w[n, pos, gk]
                    m = tap_mask[n, pos, gk]
                    a = one - lh
                    b = one - lw
                shift = np.uint64(runs[r, 3] + k * per_conv)
                for c in range(np.uint64(runs[r, 0]), np.uint64(runs[r, 1])):
                    cols[n, pos, shift + c] = m * (a * (b * xc[n, p, c] + lw * xc[n, p + 1, c])
                                                   + lh * (b * xc[n, p + wp, c] + lw * xc[n, p + wp + 1, c]))


@njit(parallel=True, cache=True)
def _im2col(xc, width, base, frac_h, frac_w, tap_mask, one, k_size, per_conv, runs, block, cols):
    """Task = (image, block of output positions)."""
    images, length, _ = cols.shape
    blocks = (length + block - 1) // block
    for task in prange(images * blocks):
        p0 = (task % blocks) * block
        _im2col_positions(xc, width + 2, base, frac_h, frac_w, tap_mask, one, k_size, per_conv, runs,
                          task // blocks, p0, min(length, p0 + block), cols)


@njit(cache=True)
def _col2im_channels(gcols, base, frac_h, frac_w, tap_mask, one, k_size, per_conv, runs, r_lo, r_hi, n, n0,
                     acc, grad_input):
    """Input gradient of image n, channels of runs r_lo..r_hi (one task of _col2im),
    accumulated in acc (bordered plane by channel block) and copied out."""
    length = gcols.shape[1]
    height, width = grad_input.shape[2], grad_input.shape[3]
    wp = width + 2
    c_lo = runs[r_lo, 0]
    c_hi = runs[r_hi - 1, 1]
    lo = np.uint64(c_lo)
    for q in range(acc.shape[0]):
        for c in range(c_hi - c_lo):
            acc[q, c] = 0.0
    for pos in range(length):
        for k in range(k_size):
            gk = -1
            for r in range(r_lo, r_hi):
                if runs[r, 2] * k_size + k != gk:  # a new offset group: load its tap
                    gk = runs[r, 2] * k_size + k
                    p = base[n, pos, gk]
                    m = tap_mask[n, pos, gk]
                    lh = frac_h[n, pos, gk]
                    lw = frac_w[n, pos, gk]
                    w00 = (one - lh) * (one - lw)
                    w01 = (one - lh) * lw
                    w10 = lh * (one - lw)
                    w11 = lh * lw
                shift = np.uint64(runs[r, 3] + k * per_conv)
                for c in range(np.uint64(runs[r, 0]), np.uint64(runs[r, 1])):
                    gv = m * gcols[n, pos, shift + c]
                    acc[p, c - lo] += w00 * gv
                    acc[p + 1, c - lo] += w01 * gv
                    acc[p + wp, c - lo] += w10 * gv
                    acc[p + wp + 1, c - lo] += w11 * gv
    for c in range(c_lo, c_hi):
        for y in range(height):
            for x in range(width):
                grad_input[n0 + n, c, y, x] = acc[(y + 1) * wp + x + 1, c - c_lo]


@njit(parallel=True, cache=True)
def _col2im(gcols, base, frac_h, frac_w, tap_mask, one, k_size, per_conv, runs, block_runs, n0, accs, grad_input):
    """Task = (image, channel block), accumulating in its own accs[image, block];
    block_runs[i]..block_runs[i+1] are block i's runs."""
    images = gcols.shape[0]
    cblocks = block_runs.shape[0] - 1
    for task in prange(images * cblocks):
        n = task // cblocks
        i = task % cblocks
        _col2im_channels(gcols, base, frac_h, frac_w, tap_mask, one, k_size, per_conv, runs,
                         block_runs[i], block_runs[i + 1], n, n0, accs[n, i], grad_input)


@njit(inline="always")
def _coord_sums(gcols, xc, n, pos, k, per_conv, runs, r_lo, r_hi, p, wp, lh, lw, one, part):
    """Sums over the channels of runs r_lo..r_hi (one offset group) of the column gradient
    times the bilinear blend's (d/dh, d/dw, value) at the tap (p, lh, lw): channel j of a
    run goes to partial sum j % _LANES (part, (3, _LANES); the loop over a run's next
    _LANES channels vectorises), and the partial sums are added up in order at the end."""
    a = one - lh
    b = one - lw
    lanes = np.uint64(_LANES)
    for v in range(_LANES):
        part[0, v] = 0.0
        part[1, v] = 0.0
        part[2, v] = 0.0
    for r in range(r_lo, r_hi):
        shift = np.uint64(runs[r, 3] + k * per_conv)
        c = np.uint64(runs[r, 0])
        end = np.uint64(runs[r, 1])
        while c < end:
            stop = min(end, c + lanes)
            for cc in range(c, stop):
                v = cc - c
                v00 = xc[n, p, cc]
                v01 = xc[n, p + 1, cc]
                v10 = xc[n, p + wp, cc]
                v11 = xc[n, p + wp + 1, cc]
                g = gcols[n, pos, shift + cc]
                part[0, v] += g * (b * (v10 - v00) + lw * (v11 - v01))
                part[1, v] += g * (a * (v01 - v00) + lh * (v11 - v10))
                part[2, v] += g * (a * (b * v00 + lw * v01) + lh * (b * v10 + lw * v11))
            c = stop
    grad_h = 0.0
    grad_w = 0.0
    grad_m = 0.0
    for v in range(_LANES):
        grad_h += part[0, v]
        grad_w += part[1, v]
        grad_m += part[2, v]
    return grad_h, grad_w, grad_m


@njit(cache=True)
def _coord_positions(gcols, xc, offset, mask, use_mask, closed_low, n0, kh, kw, sh, sw, ph, pw, dh, dw,
                     height, width, base, frac_h, frac_w, tap_mask, one, per_conv, runs, group_runs,
                     n, p0, p1, grad_offset, grad_mask):
    """Offset and mask gradients of image n, positions p0..p1 (one task of _col2im_coord)."""
    out_w = offset.shape[3]
    k_size = kh * kw
    gks = base.shape[2]
    wp = width + 2
    outside = (height + 1) * wp
    part = np.empty((3, _LANES), xc.dtype)
    frac = np.empty(2, xc.dtype)  # fractions in the input's precision, as the taps hold them
    y = p0 // out_w
    x = p0 % out_w
    for pos in range(p0, p1):
        for gk in range(gks):
            g = gk // k_size
            k = gk % k_size
            p = base[n, pos, gk]
            if p != outside:
                m = tap_mask[n, pos, gk]
                grad_h, grad_w, grad_m = _coord_sums(gcols, xc, n, pos, k, per_conv, runs,
                                                     group_runs[g], group_runs[g + 1], p, wp,
                                                     frac_h[n, pos, gk], frac_w[n, pos, gk], one, part)
            else:
                m = mask[n0 + n, gk, y, x] if use_mask else 1.0
                grad_h = 0.0
                grad_w = 0.0
                grad_m = 0.0
                # The floor-based derivative is non-zero on [-1, H) x [-1, W): with
                # border_grad="torchvision", also on the closed lower edges.
                h = y * sh - ph + (k // kw) * dh + offset[n0 + n, 2 * gk, y, x]
                w = x * sw - pw + (k % kw) * dw + offset[n0 + n, 2 * gk + 1, y, x]
                if closed_low and h >= -1.0 and h < height and w >= -1.0 and w < width:
                    h0 = math.floor(h)
                    w0 = math.floor(w)
                    frac[0] = h - h0
                    frac[1] = w - w0
                    grad_h, grad_w, grad_m = _coord_sums(gcols, xc, n, pos, k, per_conv, runs,
                                                         group_runs[g], group_runs[g + 1],
                                                         (int(h0) + 1) * wp + int(w0) + 1, wp,
                                                         frac[0], frac[1], one, part)
            grad_offset[n0 + n, 2 * gk, y, x] = m * grad_h
            grad_offset[n0 + n, 2 * gk + 1, y, x] = m * grad_w
            if use_mask:
                grad_mask[n0 + n, gk, y, x] = grad_m
        x += 1
        if x == out_w:
            x = 0
            y += 1


@njit(parallel=True, cache=True)
def _col2im_coord(gcols, xc, offset, mask, use_mask, closed_low, n0, kh, kw, sh, sw, ph, pw, dh, dw,
                  height, width, base, frac_h, frac_w, tap_mask, one, per_conv, runs, group_runs,
                  block, grad_offset, grad_mask):
    """Task = (image, block of output positions); group_runs[g]..group_runs[g+1] are offset
    group g's runs. Samples inside the open box use their taps; the others get 0, except on
    a closed lower edge with border_grad="torchvision", recomputed here from the offset."""
    images, length, _ = gcols.shape
    blocks = (length + block - 1) // block
    for task in prange(images * blocks):
        p0 = (task % blocks) * block
        _coord_positions(gcols, xc, offset, mask, use_mask, closed_low, n0, kh, kw, sh, sw, ph, pw, dh, dw,
                         height, width, base, frac_h, frac_w, tap_mask, one, per_conv, runs, group_runs,
                         task // blocks, p0, min(length, p0 + block), grad_offset, grad_mask)


def _runs(channels, per_conv, per_offset, k_size, block=None):
    """The runs table (int64 (R, 4): first channel, end, offset group, shift) of channels
    sharing weight group, offset group (and block of ``block`` channels, when given), and
    the index of each offset group's (or block's) first run, with the total at the end."""
    cuts = set(range(0, channels, per_conv)) | set(range(0, channels, per_offset))
    if block:
        cuts |= set(range(0, channels, block))
    starts = sorted(cuts)
    ends = starts[1:] + [channels]
    runs = np.array([[c, e, c // per_offset, (c // per_conv) * per_conv * (k_size - 1)]
                     for c, e in zip(starts, ends)], np.int64).reshape(-1, 4)
    first = np.searchsorted(runs[:, 0], np.arange(0, channels, block if block else per_offset))
    return runs, np.append(first, len(runs)).astype(np.int64)


_kept = threading.local()


def _scratch(name, shape, dtype):
    """An uninitialised array for a chunk buffer, kept for this thread's next call when its
    kept buffers stay within KEEP_SCRATCH_BYTES."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    pool = _kept.__dict__.setdefault("pool", {})
    buf = pool.pop(name, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(1, -(-nbytes // 8)), np.float64)  # 8-byte aligned
    if sum(b.nbytes for b in pool.values()) + buf.nbytes <= KEEP_SCRATCH_BYTES:
        pool[name] = buf
    return buf.view(np.uint8)[:nbytes].view(dtype).reshape(shape)


def _chunks(n_images: int, per_image_bytes: int):
    """(step, ranges) of images such that a buffer of per_image_bytes per image fits in
    COLUMNS_BYTES (at least one image each)."""
    step = max(1, min(n_images, COLUMNS_BYTES // max(1, per_image_bytes)))
    return step, [(n0, min(n_images, n0 + step)) for n0 in range(0, n_images, step)]


def _geometry_args(geo):
    kh, kw = geo.kernel
    return (kh, kw, *geo.stride, *geo.padding, *geo.dilation)


def _blocks(images, length, threads):
    """Output positions per task of _im2col and _col2im_coord: at least 4 tasks per thread
    in a chunk, so that small batches keep every thread busy."""
    per_image = max(1, -(-4 * threads // max(1, images)))
    return max(1, -(-length // per_image))


class _Workspace:
    """A chunk's buffers: bordered channels-last input, taps and columns."""

    def __init__(self, x, offset, mask, use_mask, geo, columns_buffers):
        n, c_in, h, w = x.shape
        kk = geo.kernel[0] * geo.kernel[1]
        out_h, out_w = geo.out_size
        length = out_h * out_w
        gk = geo.offset_groups * kk
        s = x.itemsize
        size = (h + 3) * (w + 2)
        per_image = max(c_in * kk * length * s,  # one columns buffer
                        gk * length * (8 + 3 * s),  # taps
                        -(-c_in // _CHANNEL_BLOCK) * _CHANNEL_BLOCK * size * s)  # bordered input, accumulators
        self.step, self.chunks = _chunks(n, per_image)
        step = self.step
        self.xc = _scratch("xc", (step, size, c_in), x.dtype)
        self.base = _scratch("base", (step, length, gk), np.int64)
        self.frac_h = _scratch("frac_h", (step, length, gk), x.dtype)
        self.frac_w = _scratch("frac_w", (step, length, gk), x.dtype)
        self.tap_mask = _scratch("tap_mask", (step, length, gk), x.dtype)
        self.columns = [_scratch(f"columns{i}", (step, length, c_in * kk), x.dtype) for i in range(columns_buffers)]
        self.one = x.dtype.type(1)
        self.x, self.offset, self.mask, self.use_mask = x, offset, mask, use_mask
        self.geo_args = _geometry_args(geo)
        self.hw = (h, w)
        self.k_size = kk
        self.per_conv = c_in // geo.groups
        per_offset = c_in // geo.offset_groups
        self.runs, self.group_runs = _runs(c_in, self.per_conv, per_offset, kk)
        self.block_runs = _runs(c_in, self.per_conv, per_offset, kk, _CHANNEL_BLOCK)
        self.threads = numba.get_num_threads()
        self.length = length
        self.size = size

    def taps(self, n0, b):
        """Fill the bordered input and the taps of images n0..n0+b; returns the taps."""
        _pad(self.x, n0, self.xc[:b])
        t = (self.base[:b], self.frac_h[:b], self.frac_w[:b], self.tap_mask[:b])
        _taps(self.offset, self.mask, self.use_mask, n0, *self.geo_args, *self.hw, *t)
        return t

    def im2col(self, b, taps, cols):
        _im2col(self.xc[:b], self.hw[1], *taps, self.one, self.k_size, self.per_conv, self.runs,
                _blocks(b, self.length, self.threads), cols)

    def col2im(self, b, taps, gcols, n0, grad_input):
        accs = _scratch("accs", (b, len(self.block_runs[1]) - 1, self.size, _CHANNEL_BLOCK), self.x.dtype)
        _col2im(gcols, *taps, self.one, self.k_size, self.per_conv, *self.block_runs, n0, accs, grad_input)

    def col2im_coord(self, b, taps, gcols, closed_low, n0, grad_offset, grad_mask):
        _col2im_coord(gcols, self.xc[:b], self.offset, self.mask, self.use_mask, closed_low, n0,
                      *self.geo_args, *self.hw, *taps, self.one, self.per_conv, self.runs, self.group_runs,
                      _blocks(b, self.length, self.threads), grad_offset, grad_mask)


def _weight_columns_order(weight, g):
    """The weight as (groups, C_out/groups, kh*kw*C_in/groups), matching the columns' order."""
    c_out, cg, kh, kw = weight.shape
    return np.ascontiguousarray(weight.reshape(g, c_out // g, cg, kh * kw).transpose(0, 1, 3, 2)).reshape(
        g, c_out // g, kh * kw * cg)


def _setup(x, weight, mask, geo):
    """What both passes start from: whether a mask was given, the mask for the kernels (a
    dummy that they never read when none was), the sizes (N, C_in, C_out, H_out, W_out,
    groups) and the weight in the columns' order."""
    use_mask = mask is not None
    mask = mask if use_mask else np.zeros((1, 1, 1, 1), x.dtype)
    g = geo.groups
    return use_mask, mask, (*x.shape[:2], weight.shape[0], *geo.out_size, g), _weight_columns_order(weight, g)


def _serial_kernels(fn):
    """Run ``fn`` with the calling thread's Numba kernels on that thread alone (restored after).

    With Numba's OpenMP threading layer, a worker keeps spinning for milliseconds after each
    parallel loop, and it then competes for the cores with the BLAS threads of the matmul that
    follows: on 2 cores that made the forward 5-20x slower than its own kernels and GEMM
    (benchmarks/bench_deform_conv_cpu.py). The kernels are now a small part of the op, the
    GEMMs keep BLAS's threads, and the setting is per thread, so nothing global changes.
    """

    @functools.wraps(fn)
    def serial(*args, **kwargs):
        previous = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            numba.set_num_threads(previous)

    return serial


@_serial_kernels
def forward(input, offset, weight, bias, mask, *, geo, dtype):
    x = input
    use_mask, mask, (n, c_in, c_out, out_h, out_w, g), w = _setup(x, weight, mask, geo)
    length = out_h * out_w
    rows = w.shape[2]
    out = np.empty((n, c_out, out_h, out_w), x.dtype)
    ws = _Workspace(x, offset, mask, use_mask, geo, 1)
    cols = ws.columns[0]
    for n0, n1 in ws.chunks:
        b = n1 - n0
        taps = ws.taps(n0, b)
        ws.im2col(b, taps, cols[:b])
        np.matmul(w, cols[:b].reshape(b, length, g, rows).transpose(0, 2, 3, 1),
                  out=out[n0:n1].reshape(b, g, c_out // g, length))
    if bias is not None:
        out += bias.reshape(1, c_out, 1, 1)
    return out


@_serial_kernels
def backward(grad_output, input, offset, weight, bias, mask, *, geo, dtype, border_grad, deterministic):
    x, go = input, grad_output
    use_mask, mask_arr, (n, c_in, c_out, out_h, out_w, g), w = _setup(x, weight, mask, geo)
    length = out_h * out_w
    rows = w.shape[2]

    grad_input = np.empty_like(x)
    grad_offset = np.empty_like(offset)
    grad_mask = np.empty_like(mask_arr) if use_mask else np.zeros((1, 1, 1, 1), x.dtype)
    grad_w = np.zeros((g, c_out // g, rows), x.dtype)
    ws = _Workspace(x, offset, mask_arr, use_mask, geo, 2)
    cols, gcols = ws.columns
    for n0, n1 in ws.chunks:
        b = n1 - n0
        go_g = go[n0:n1].reshape(b, g, c_out // g, length)
        taps = ws.taps(n0, b)
        ws.im2col(b, taps, cols[:b])
        grad_w += np.matmul(go_g, cols[:b].reshape(b, length, g, rows).transpose(0, 2, 1, 3)).sum(axis=0)
        np.matmul(go_g.transpose(0, 1, 3, 2), w, out=gcols[:b].reshape(b, length, g, rows).transpose(0, 2, 1, 3))
        ws.col2im(b, taps, gcols[:b], n0, grad_input)
        ws.col2im_coord(b, taps, gcols[:b], border_grad == "torchvision", n0, grad_offset, grad_mask)
    kh, kw = geo.kernel
    grad_weight = np.ascontiguousarray(
        grad_w.reshape(g, c_out // g, kh * kw, c_in // g).transpose(0, 1, 3, 2)).reshape(weight.shape)
    grad_bias = go.sum(axis=(0, 2, 3)) if bias is not None else None
    return (grad_input, grad_offset, grad_weight, grad_bias, grad_mask if use_mask else None)
