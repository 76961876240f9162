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
