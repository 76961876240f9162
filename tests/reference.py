"""Naive float64 references written from the papers' equations and SPEC.md.

They are the oracle of the test suite: slow, vectorised only where it keeps them readable,
and sharing no code with the library.
"""

from __future__ import annotations

import numpy as np


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


# --------------------------------------------------------------------------------------------
# Deformable convolution (SPEC.md section 1)
# --------------------------------------------------------------------------------------------

def _corner_values(img, hs, ws):
    """Values of the four integer neighbours (floor, floor+1) of each point, 0 outside the image."""
    H, W = img.shape
    h0 = np.floor(hs).astype(np.int64)
    w0 = np.floor(ws).astype(np.int64)
    vals = {}
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = h0 + dy, w0 + dx
            ok = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            vals[dy, dx] = np.where(ok, img[np.clip(yy, 0, H - 1), np.clip(xx, 0, W - 1)], 0.0)
    return h0, w0, vals


def bilinear(img, hs, ws):
    """Zero-padded bilinear sample; 0 outside the open box (-1, H) x (-1, W)."""
    H, W = img.shape
    inside = (hs > -1) & (hs < H) & (ws > -1) & (ws < W)
    hs = np.where(inside, hs, 0.0)
    ws = np.where(inside, ws, 0.0)
    h0, w0, v = _corner_values(img, hs, ws)
    lh, lw = hs - h0, ws - w0
    val = ((1 - lh) * (1 - lw) * v[0, 0] + (1 - lh) * lw * v[0, 1]
           + lh * (1 - lw) * v[1, 0] + lh * lw * v[1, 1])
    return np.where(inside, val, 0.0)


def bilinear_position_grad(img, hs, ws, border_grad="torchvision"):
    """(d/dh, d/dw) of :func:`bilinear`, taken from the right at the kinks.

    torchvision: non-zero on [-1, H) x [-1, W); mmcv: only on the open box (-1, H) x (-1, W).
    """
    H, W = img.shape
    if border_grad == "torchvision":
        live = (hs >= -1) & (hs < H) & (ws >= -1) & (ws < W)
    else:
        live = (hs > -1) & (hs < H) & (ws > -1) & (ws < W)
    hs = np.where(live, hs, 0.0)
    ws = np.where(live, ws, 0.0)
    h0, w0, v = _corner_values(img, hs, ws)
    lh, lw = hs - h0, ws - w0
    d_h = (1 - lw) * (v[1, 0] - v[0, 0]) + lw * (v[1, 1] - v[0, 1])
    d_w = (1 - lh) * (v[0, 1] - v[0, 0]) + lh * (v[1, 1] - v[1, 0])
    return np.where(live, d_h, 0.0), np.where(live, d_w, 0.0)


def _samples(x, offset, mask, kh, kw, stride, padding, dilation):
    """The modulated samples m * x(p + p_k + dp_k): (N, C_in, kh*kw, H_out, W_out), and the
    sampling positions (N, G, kh*kw, H_out, W_out) for h and w."""
    N, C, H, W = x.shape
    G = offset.shape[1] // (2 * kh * kw)
    out_h, out_w = offset.shape[2:]
    hs = np.empty((N, G, kh * kw, out_h, out_w))
    ws = np.empty_like(hs)
    for i in range(kh):
        for j in range(kw):
            k = i * kw + j
            base_h = np.arange(out_h)[:, None] * stride[0] - padding[0] + i * dilation[0]
            base_w = np.arange(out_w)[None, :] * stride[1] - padding[1] + j * dilation[1]
            for g in range(G):
                hs[:, g, k] = base_h + offset[:, 2 * (g * kh * kw + k)]
                ws[:, g, k] = base_w + offset[:, 2 * (g * kh * kw + k) + 1]
    vals = np.empty((N, C, kh * kw, out_h, out_w))
    for n in range(N):
        for c in range(C):
            g = c // (C // G)
            vals[n, c] = bilinear(x[n, c], hs[n, g], ws[n, g])
    m = np.ones((N, G, kh * kw, out_h, out_w)) if mask is None else mask.reshape(N, G, kh * kw, out_h, out_w)
    return vals, hs, ws, m


def deform_conv2d(x, offset, weight, bias=None, *, stride=1, padding=0, dilation=1, mask=None):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    x, offset, weight = (np.asarray(a, np.float64) for a in (x, offset, weight))
    N, C, H, W = x.shape
    C_out, Cg, kh, kw = weight.shape
    groups = C // Cg
    G = offset.shape[1] // (2 * kh * kw)
    vals, _, _, m = _samples(x, offset, mask, kh, kw, stride, padding, dilation)
    cols = vals * np.repeat(m, C // G, axis=1)  # (N, C, K, Ho, Wo)
    out = np.zeros((N, C_out) + offset.shape[2:])
    Og = C_out // groups
    for gr in range(groups):
        w = weight[gr * Og:(gr + 1) * Og].reshape(Og, Cg, kh * kw)
        out[:, gr * Og:(gr + 1) * Og] = np.einsum("ock,nckyx->noyx", w, cols[:, gr * Cg:(gr + 1) * Cg])
    if bias is not None:
        out += np.asarray(bias, np.float64)[None, :, None, None]
    return out


def deform_conv2d_backward(grad_out, x, offset, weight, bias=None, *, stride=1, padding=0, dilation=1,
                           mask=None, border_grad="torchvision"):
    """Gradients (input, offset, weight, bias, mask) from the chain rule on the equations."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    N, C, H, W = x.shape
    C_out, Cg, kh, kw = weight.shape
    K = kh * kw
    groups = C // Cg
    G = offset.shape[1] // (2 * K)
    Cpg = C // G
    Og = C_out // groups
    vals, hs, ws, m = _samples(x, offset, mask, kh, kw, stride, padding, dilation)
    m_c = np.repeat(m, Cpg, axis=1)
    # dL/d(sample * mask) for every (n, c, k, y, x).
    d_col = np.zeros_like(vals)
    for gr in range(groups):
        w = weight[gr * Og:(gr + 1) * Og].reshape(Og, Cg, K)
        d_col[:, gr * Cg:(gr + 1) * Cg] = np.einsum("ock,noyx->nckyx", w, grad_out[:, gr * Og:(gr + 1) * Og])
    grad_weight = np.zeros_like(weight)
    for gr in range(groups):
        cols = (vals * m_c)[:, gr * Cg:(gr + 1) * Cg]
        grad_weight[gr * Og:(gr + 1) * Og] = np.einsum(
            "noyx,nckyx->ock", grad_out[:, gr * Og:(gr + 1) * Og], cols).reshape(Og, Cg, kh, kw)
    grad_bias = grad_out.sum(axis=(0, 2, 3)) if bias is not None else None
    d_val = d_col * m_c
    grad_mask = None
    if mask is not None:
        grad_mask = (d_col * vals).reshape(N, G, Cpg, K, *vals.shape[3:]).sum(axis=2).reshape(mask.shape)
    grad_input = np.zeros_like(x)
    grad_offset = np.zeros_like(offset)
    for n in range(N):
        for c in range(C):
            g = c // Cpg
            for k in range(K):
                h, w_, d = hs[n, g, k], ws[n, g, k], d_val[n, c, k]
                inside = (h > -1) & (h < H) & (w_ > -1) & (w_ < W)
                h0 = np.floor(h).astype(np.int64)
                w0 = np.floor(w_).astype(np.int64)
                for dy in (0, 1):
                    for dx in (0, 1):
                        yy, xx = h0 + dy, w0 + dx
                        wt = (1 - np.abs(h - yy)) * (1 - np.abs(w_ - xx))
                        ok = inside & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
                        np.add.at(grad_input[n, c], (yy[ok], xx[ok]), (wt * d)[ok])
                d_h, d_w = bilinear_position_grad(x[n, c], h, w_, border_grad)
                grad_offset[n, 2 * (g * K + k)] += d * d_h
                grad_offset[n, 2 * (g * K + k) + 1] += d * d_w
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask


# --------------------------------------------------------------------------------------------
# Deformable RoI pooling (SPEC.md section 2) and deformable PS RoI pooling (section 3)
# --------------------------------------------------------------------------------------------

def _blend_with_slopes(img, y_lo, y_hi, x_lo, x_hi, ly, lx):
    """Bilinear blend of the (C,) corner vectors of img (C, H, W): the value, d/dy, d/dx on the
    cell [y_lo, y_lo + 1] x [x_lo, x_lo + 1], and the (row, col, weight) of each corner."""
    hy, hx = 1 - ly, 1 - lx
    v1, v2, v3, v4 = img[:, y_lo, x_lo], img[:, y_lo, x_hi], img[:, y_hi, x_lo], img[:, y_hi, x_hi]
    value = hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4
    d_y = hx * (v3 - v1) + lx * (v4 - v2)
    d_x = hy * (v2 - v1) + ly * (v4 - v3)
    taps = [(y_lo, x_lo, hy * hx), (y_lo, x_hi, hy * lx), (y_hi, x_lo, ly * hx), (y_hi, x_hi, ly * lx)]
    return value, d_y, d_x, taps


def _roi_align_sample(img, y, x):
    """mmcv's / torchvision's RoIAlign bilinear_interpolate at (y, x), with its derivatives
    (taken from the right; 0 along a clamped coordinate), or None outside [-1, H] x [-1, W]."""
    _, H, W = img.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return None
    moves_y, moves_x = 0 <= y < H - 1, 0 <= x < W - 1
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= H - 1:
        y_high = y_low = H - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= W - 1:
        x_high = x_low = W - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    value, d_y, d_x, taps = _blend_with_slopes(img, y_low, y_high, x_low, x_high, y - y_low, x - x_low)
    return value, d_y * moves_y, d_x * moves_x, taps


def _deform_roi_pool(x, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma, grad_out=None):
    """The output, and with grad_out the gradients (input, offset, mask), by the chain rule."""
    x, rois = np.asarray(x, np.float64), np.asarray(rois, np.float64)
    N, C, H, W = x.shape
    ph, pw = _pair(output_size)
    R = rois.shape[0]
    out = np.zeros((R, C, ph, pw))
    g_in, g_off, g_mask = np.zeros_like(x), np.zeros((R, 2, ph, pw)), np.zeros((R, 1, ph, pw))
    for r in range(R):
        b = int(rois[r, 0])
        roi_start_w = rois[r, 1] * spatial_scale - 0.5
        roi_start_h = rois[r, 2] * spatial_scale - 0.5
        roi_w = rois[r, 3] * spatial_scale - 0.5 - roi_start_w
        roi_h = rois[r, 4] * spatial_scale - 0.5 - roi_start_h
        bin_h, bin_w = roi_h / ph, roi_w / pw
        grid_h = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_h / ph))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(np.ceil(roi_w / pw))
        count = max(grid_h * grid_w, 1)
        for p in range(ph):
            for q in range(pw):
                start_h, start_w = roi_start_h, roi_start_w
                if offset is not None:
                    start_w += gamma * roi_w * offset[r, 0, p, q]
                    start_h += gamma * roi_h * offset[r, 1, p, q]
                m = 1.0 if mask is None else mask[r, 0, p, q]
                total, d_y, d_x = np.zeros(C), np.zeros(C), np.zeros(C)
                for iy in range(grid_h):
                    y = start_h + p * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        xx = start_w + q * bin_w + (ix + 0.5) * bin_w / grid_w
                        s = _roi_align_sample(x[b], y, xx)
                        if s is None:
                            continue
                        total += s[0]
                        d_y += s[1]
                        d_x += s[2]
                        if grad_out is not None:
                            for ty, tx, wt in s[3]:
                                g_in[b, :, ty, tx] += wt * grad_out[r, :, p, q] * m / count
                out[r, :, p, q] = total / count * m
                if grad_out is not None:
                    g = grad_out[r, :, p, q]
                    g_off[r, 0, p, q] = gamma * roi_w * m / count * (g @ d_x)
                    g_off[r, 1, p, q] = gamma * roi_h * m / count * (g @ d_y)
                    g_mask[r, 0, p, q] = g @ total / count
    return out, g_in, g_off if offset is not None else None, g_mask if mask is not None else None


def deform_roi_pool(x, rois, offset=None, *, output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                    mask=None):
    return _deform_roi_pool(x, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma)[0]


def deform_roi_pool_backward(grad_out, x, rois, offset=None, *, output_size, spatial_scale=1.0, sampling_ratio=0,
                             gamma=0.1, mask=None):
    """Gradients (input, offset, mask); None for an argument not given."""
    return _deform_roi_pool(x, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma,
                            np.asarray(grad_out, np.float64))[1:]


def _c_round(v):
    """C's round(): halves away from zero."""
    return float(np.sign(v) * np.floor(np.abs(v) + 0.5))


def _psroi_sample(img, h, w):
    """MSRA's dmcn_im2col_bilinear after its clamp, with derivatives (from the right; 0 along a
    clamped coordinate), or None outside [-0.5, H - 0.5] x [-0.5, W - 0.5]."""
    _, H, W = img.shape
    if w < -0.5 or w > W - 0.5 or h < -0.5 or h > H - 0.5:
        return None
    moves_h, moves_w = 0 <= h < H - 1, 0 <= w < W - 1
    w, h = min(max(w, 0.0), W - 1.0), min(max(h, 0.0), H - 1.0)
    x1, x2, y1, y2 = int(np.floor(w)), int(np.ceil(w)), int(np.floor(h)), int(np.ceil(h))
    value, _, _, taps = _blend_with_slopes(img, y1, y2, x1, x2, h - y1, w - x1)
    # The slopes on the cell to the right of the floor (ceil == floor at integer coordinates).
    _, d_h, _, _ = _blend_with_slopes(img, y1, min(y1 + 1, H - 1), x1, x2, h - y1, w - x1)
    _, _, d_w, _ = _blend_with_slopes(img, y1, y2, x1, min(x1 + 1, W - 1), h - y1, w - x1)
    return value, d_h * moves_h, d_w * moves_w, taps


def _deform_psroi_pool(x, rois, offset, output_dim, pooled_size, group_size, part_size, sample_per_part,
                       spatial_scale, trans_std, grad_out=None):
    x, rois = np.asarray(x, np.float64), np.asarray(rois, np.float64)
    N, C, H, W = x.shape
    k = pooled_size
    part_size = k if part_size is None else part_size
    R = rois.shape[0]
    num_classes = 1 if offset is None else offset.shape[1] // 2
    per_class = output_dim // num_classes
    out = np.zeros((R, output_dim, k, k))
    g_in = np.zeros_like(x)
    g_off = None if offset is None else np.zeros_like(offset, dtype=np.float64)
    for r in range(R):
        b = int(rois[r, 0])
        roi_start_w = _c_round(rois[r, 1]) * spatial_scale - 0.5
        roi_start_h = _c_round(rois[r, 2]) * spatial_scale - 0.5
        roi_end_w = (_c_round(rois[r, 3]) + 1.0) * spatial_scale - 0.5
        roi_end_h = (_c_round(rois[r, 4]) + 1.0) * spatial_scale - 0.5
        roi_w, roi_h = max(roi_end_w - roi_start_w, 0.1), max(roi_end_h - roi_start_h, 0.1)
        bin_h, bin_w = roi_h / k, roi_w / k
        sub_h, sub_w = bin_h / sample_per_part, bin_w / sample_per_part
        for ctop in range(output_dim):
            cls = ctop // per_class
            for p in range(k):
                for q in range(k):
                    part_h, part_w = int(np.floor(p / k * part_size)), int(np.floor(q / k * part_size))
                    tx = ty = 0.0
                    if offset is not None:
                        tx = offset[r, 2 * cls, part_h, part_w] * trans_std
                        ty = offset[r, 2 * cls + 1, part_h, part_w] * trans_std
                    wstart = q * bin_w + roi_start_w + tx * roi_w
                    hstart = p * bin_h + roi_start_h + ty * roi_h
                    gh = min(max(int(np.floor(p * group_size / k)), 0), group_size - 1)
                    gw = min(max(int(np.floor(q * group_size / k)), 0), group_size - 1)
                    c = (ctop * group_size + gh) * group_size + gw
                    samples = []
                    for ih in range(sample_per_part):
                        for iw in range(sample_per_part):
                            s = _psroi_sample(x[b, c:c + 1], hstart + ih * sub_h, wstart + iw * sub_w)
                            if s is not None:
                                samples.append(s)
                    if not samples:
                        continue
                    n = len(samples)
                    out[r, ctop, p, q] = sum(s[0][0] for s in samples) / n
                    if grad_out is None:
                        continue
                    g = grad_out[r, ctop, p, q] / n
                    for s in samples:
                        for ty_, tx_, wt in s[3]:
                            g_in[b, c, ty_, tx_] += wt * g
                    if offset is not None:
                        g_off[r, 2 * cls, part_h, part_w] += trans_std * roi_w * g * sum(s[2][0] for s in samples)
                        g_off[r, 2 * cls + 1, part_h, part_w] += trans_std * roi_h * g * sum(s[1][0] for s in samples)
    return out, g_in, g_off


def deform_psroi_pool(x, rois, offset=None, *, output_dim, pooled_size, group_size=1, part_size=None,
                      sample_per_part=4, spatial_scale=1.0, trans_std=0.1):
    return _deform_psroi_pool(x, rois, offset, output_dim, pooled_size, group_size, part_size, sample_per_part,
                              spatial_scale, trans_std)[0]


def deform_psroi_pool_backward(grad_out, x, rois, offset=None, *, output_dim, pooled_size, group_size=1,
                               part_size=None, sample_per_part=4, spatial_scale=1.0, trans_std=0.1):
    """Gradients (input, offset); None for an argument not given."""
    return _deform_psroi_pool(x, rois, offset, output_dim, pooled_size, group_size, part_size, sample_per_part,
                              spatial_scale, trans_std, np.asarray(grad_out, np.float64))[1:]


# --------------------------------------------------------------------------------------------
# Deformable Kernels (SPEC.md section 4): out = sum_k I_{j+k} W_{k + dk}
# --------------------------------------------------------------------------------------------

def _dk_setup(x, weight, kernel_offset, kernel_size, stride, padding, dilation):
    """The rigid patches (N, C_in, kh*kw, H_out, W_out) of the zero-padded input, and the
    scope positions hs, ws (N, G, kh*kw, H_out, W_out) every kernel point samples."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (kernel_size, stride, padding, dilation))
    N, C, H, W = x.shape
    S_h, S_w = weight.shape[2:]
    K = kh * kw
    out_h = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (W + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    padded = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    padded[:, :, ph:ph + H, pw:pw + W] = x
    patches = np.empty((N, C, K, out_h, out_w))
    windows = []
    for i in range(kh):
        for j in range(kw):
            window = (slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh), slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw))
            patches[:, :, i * kw + j] = padded[:, :, window[0], window[1]]
            windows.append(window)
    G = kernel_offset.shape[1] // (2 * K)
    off = kernel_offset.reshape(N, G, K, 2, *kernel_offset.shape[2:])
    if off.ndim == 4:  # global DK: the same offsets at every output position
        off = off[..., None, None]
    off = np.broadcast_to(off, (N, G, K, 2, out_h, out_w))
    i = (np.arange(K) // kw)[None, None, :, None, None]
    j = (np.arange(K) % kw)[None, None, :, None, None]
    hs = i + (S_h - kh) / 2 + off[:, :, :, 0]
    ws = j + (S_w - kw) / 2 + off[:, :, :, 1]
    return patches, hs, ws, windows, (ph, pw)


def _dk_kernels(weight, hs, ws):
    """The sampled kernels (N, C_out, C_in/groups, kh*kw, H_out, W_out): the scope of (o, c)
    read at the positions of o's offset group."""
    C_out, Cg = weight.shape[:2]
    G = hs.shape[1]
    out = np.empty((hs.shape[0], C_out, Cg) + hs.shape[2:])
    for o in range(C_out):
        g = o // (C_out // G)
        for c in range(Cg):
            out[:, o, c] = bilinear(weight[o, c], hs[:, g], ws[:, g])
    return out


def deform_kernel_conv2d(x, weight, kernel_offset, bias=None, *, kernel_size, stride=1, padding=0, dilation=1,
                         groups=1):
    x, weight, kernel_offset = (np.asarray(a, np.float64) for a in (x, weight, kernel_offset))
    patches, hs, ws, _, _ = _dk_setup(x, weight, kernel_offset, kernel_size, stride, padding, dilation)
    kernels = _dk_kernels(weight, hs, ws)
    C_out, Cg = weight.shape[:2]
    Og = C_out // groups
    out = np.empty((x.shape[0], C_out) + patches.shape[3:])
    for o in range(C_out):
        first = (o // Og) * Cg
        out[:, o] = np.einsum("nckyx,nckyx->nyx", kernels[:, o], patches[:, first:first + Cg])
    if bias is not None:
        out += np.asarray(bias, np.float64)[None, :, None, None]
    return out


def deform_kernel_conv2d_backward(grad_out, x, weight, kernel_offset, bias=None, *, kernel_size, stride=1,
                                  padding=0, dilation=1, groups=1):
    """Gradients (input, weight, kernel_offset, bias) from the chain rule on the equations;
    the offset gradient is the derivative from the right (torchvision's convention)."""
    grad_out, x, weight, kernel_offset = (np.asarray(a, np.float64) for a in (grad_out, x, weight, kernel_offset))
    patches, hs, ws, windows, (ph, pw) = _dk_setup(x, weight, kernel_offset, kernel_size, stride, padding, dilation)
    kernels = _dk_kernels(weight, hs, ws)
    C_out, Cg, S_h, S_w = weight.shape
    Og = C_out // groups
    G = hs.shape[1]
    grad_patches = np.zeros_like(patches)
    grad_weight = np.zeros_like(weight)
    grad_h = np.zeros_like(hs)
    grad_w = np.zeros_like(ws)
    inside = (hs > -1) & (hs < S_h) & (ws > -1) & (ws < S_w)
    for o in range(C_out):
        first, g = (o // Og) * Cg, o // (C_out // G)
        go = grad_out[:, o, None, None]
        grad_patches[:, first:first + Cg] += go * kernels[:, o]
        d_kernels = go * patches[:, first:first + Cg]  # dL / d kernels[:, o]
        h, w, ok = hs[:, g], ws[:, g], inside[:, g]
        h0, w0 = np.floor(h).astype(np.int64), np.floor(w).astype(np.int64)
        for c in range(Cg):
            d = d_kernels[:, c]
            for yy in (h0, h0 + 1):
                for xx in (w0, w0 + 1):
                    wt = (1 - np.abs(h - yy)) * (1 - np.abs(w - xx))
                    m = ok & (yy >= 0) & (yy < S_h) & (xx >= 0) & (xx < S_w)
                    np.add.at(grad_weight[o, c], (yy[m], xx[m]), (wt * d)[m])
            d_h, d_w = bilinear_position_grad(weight[o, c], h, w)
            grad_h[:, g] += d * d_h
            grad_w[:, g] += d * d_w
    N, C, H, W = x.shape
    padded = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    for k, window in enumerate(windows):
        padded[:, :, window[0], window[1]] += grad_patches[:, :, k]
    grad_input = padded[:, :, ph:ph + H, pw:pw + W]
    grad_offset = np.stack([grad_h, grad_w], axis=3)  # (N, G, K, 2, H_out, W_out)
    if kernel_offset.ndim == 2:
        grad_offset = grad_offset.sum(axis=(4, 5))
    grad_offset = grad_offset.reshape(kernel_offset.shape)
    grad_bias = grad_out.sum(axis=(0, 2, 3)) if bias is not None else None
    return grad_input, grad_weight, grad_offset, grad_bias
