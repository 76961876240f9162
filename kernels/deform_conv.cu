// Deformable convolution (DCN v1/v2): im2col / col2im kernels around cuBLAS GEMMs.
// Host code: cudeform/cuda/deform_conv.py. CPU twin: cudeform/cpu/deform_conv.py.
//
// A chunk of `batch` images starting at image `n0` is processed at a time. Its columns are a
// (C_in * kh * kw, batch * L) matrix, L = H_out * W_out, row c * K + k holding the (masked)
// samples of input channel c at kernel point k, so one GEMM per weight group multiplies them.
// Every kernel is templated on the storage type T and computes in acc<T>::type.
#include "common.cuh"

using namespace cudeform;

// The geometry every kernel of this file takes, in this order (see _geometry_args in the host).
#define DCN_GEOMETRY                                                                            \
    index_t batch, index_t n0, index_t channels, index_t height, index_t width,                \
    index_t offset_groups, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,     \
    index_t out_h, index_t out_w

// One thread per (channel, image, output position); it walks the kernel points, so the
// writes of a warp to one columns row are contiguous.
template <typename T>
__global__ void dcn_im2col(const T* __restrict__ input, const T* __restrict__ offset,
                           const T* __restrict__ mask, int use_mask, DCN_GEOMETRY,
                           T* __restrict__ cols) {
    typedef typename acc<T>::type A;
    const index_t L = out_h * out_w, K = (index_t)kh * kw, bL = batch * L;
    const index_t per_group = channels / offset_groups;
    CUDEFORM_LOOP(idx, channels * bL) {
        const index_t l = idx % L, n = (idx / L) % batch, c = idx / bL;
        const index_t y = l / out_w, x = l % out_w, g = c / per_group, img = n0 + n;
        const T* plane = input + (img * channels + c) * height * width;
        const T* off = offset + (img * offset_groups + g) * 2 * K * L + l;
        const T* msk = mask + (img * offset_groups + g) * K * L + l;
        T* col = cols + c * K * bL + n * L + l;
        for (int i = 0; i < kh; ++i) {
            for (int j = 0; j < kw; ++j) {
                const index_t k = (index_t)i * kw + j;
                const A h = A(y * sh - ph + (index_t)i * dh) + to_acc(off[2 * k * L]);
                const A w = A(x * sw - pw + (index_t)j * dw) + to_acc(off[(2 * k + 1) * L]);
                A v = bilinear_zero<A>(plane, height, width, h, w);
                if (use_mask) v *= to_acc(msk[k * L]);
                col[k * bL] = from_acc<T>(v);
            }
        }
    }
}

// The sampling position and the masked column gradient of one (channel, image, position,
// kernel point); false when the point cannot see the image.
template <typename T, typename A>
__device__ __forceinline__ bool col2im_sample(const T* gcols, const T* offset, const T* mask, int use_mask,
                                              DCN_GEOMETRY, index_t idx, int i, int j,
                                              A& h, A& w, A& gv, index_t& plane_index) {
    const index_t L = out_h * out_w, K = (index_t)kh * kw, bL = batch * L;
    const index_t l = idx % L, n = (idx / L) % batch, c = idx / bL;
    const index_t y = l / out_w, x = l % out_w, g = c / (channels / offset_groups), img = n0 + n;
    const index_t k = (index_t)i * kw + j;
    const index_t oi = ((img * offset_groups + g) * 2 * K + 2 * k) * L + l;
    h = A(y * sh - ph + (index_t)i * dh) + to_acc(offset[oi]);
    w = A(x * sw - pw + (index_t)j * dw) + to_acc(offset[oi + L]);
    if (!in_open_box(h, w, height, width)) return false;
    gv = to_acc(gcols[(c * K + k) * bL + n * L + l]);
    if (use_mask) gv *= to_acc(mask[((img * offset_groups + g) * K + k) * L + l]);
    plane_index = img * channels + c;
    return true;
}

// Input gradient, default mode: float atomics into `grad` (N, C, H, W) of type acc<T>::type.
template <typename T>
__global__ void dcn_col2im(const T* __restrict__ gcols, const T* __restrict__ offset,
                           const T* __restrict__ mask, int use_mask, DCN_GEOMETRY,
                           typename acc<T>::type* __restrict__ grad) {
    typedef typename acc<T>::type A;
    CUDEFORM_LOOP(idx, channels * batch * out_h * out_w) {
        for (int i = 0; i < kh; ++i) {
            for (int j = 0; j < kw; ++j) {
                A h, w, gv;
                index_t plane;
                if (!col2im_sample<T, A>(gcols, offset, mask, use_mask, batch, n0, channels, height, width,
                                         offset_groups, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w,
                                         idx, i, j, h, w, gv, plane))
                    continue;
                Corners<A> p(h, w);
                A* target = grad + plane * height * width;
                for (int dy = 0; dy < 2; ++dy) {
                    for (int dx = 0; dx < 2; ++dx) {
                        const index_t yy = p.y0 + dy, xx = p.x0 + dx;
                        if (yy < 0 || yy >= height || xx < 0 || xx >= width) continue;
                        const A wt = (dy ? p.lh : A(1) - p.lh) * (dx ? p.lw : A(1) - p.lw);
                        atomic_add(target + yy * width + xx, wt * gv);
                    }
                }
            }
        }
    }
}

// Deterministic mode, pass 1: the largest finite |masked column gradient| of the chunk.
template <typename T>
__global__ void dcn_col2im_max_abs(const T* __restrict__ gcols, const T* __restrict__ offset,
                                   const T* __restrict__ mask, int use_mask, DCN_GEOMETRY,
                                   unsigned int* __restrict__ max_abs_bits) {
    typedef typename acc<T>::type A;
    A local = A(0);
    CUDEFORM_LOOP(idx, channels * batch * out_h * out_w) {
        for (int i = 0; i < kh; ++i) {
            for (int j = 0; j < kw; ++j) {
                A h, w, gv;
                index_t plane;
                if (col2im_sample<T, A>(gcols, offset, mask, use_mask, batch, n0, channels, height, width,
                                        offset_groups, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w,
                                        idx, i, j, h, w, gv, plane)
                    && isfinite(gv) && fabs(gv) > local)
                    local = fabs(gv);
            }
        }
    }
    atomic_max_abs(max_abs_bits, local);
}

// Deterministic mode, pass 2: fixed-point atomics into `fixed` (batch, C, H, W) for the chunk;
// non-finite contributions go to `grad` (N, C, H, W) as in the default mode.
template <typename T>
__global__ void dcn_col2im_fixed(const T* __restrict__ gcols, const T* __restrict__ offset,
                                 const T* __restrict__ mask, int use_mask, DCN_GEOMETRY,
                                 const unsigned int* __restrict__ max_abs_bits,
                                 unsigned long long* __restrict__ fixed,
                                 typename acc<T>::type* __restrict__ grad) {
    typedef typename acc<T>::type A;
    const double scale = fixed_point_scale(*max_abs_bits, (index_t)kh * kw * out_h * out_w);
    const index_t hw = height * width;
    CUDEFORM_LOOP(idx, channels * batch * out_h * out_w) {
        for (int i = 0; i < kh; ++i) {
            for (int j = 0; j < kw; ++j) {
                A h, w, gv;
                index_t plane;
                if (!col2im_sample<T, A>(gcols, offset, mask, use_mask, batch, n0, channels, height, width,
                                         offset_groups, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w,
                                         idx, i, j, h, w, gv, plane))
                    continue;
                Corners<A> p(h, w);
                for (int dy = 0; dy < 2; ++dy) {
                    for (int dx = 0; dx < 2; ++dx) {
                        const index_t yy = p.y0 + dy, xx = p.x0 + dx;
                        if (yy < 0 || yy >= height || xx < 0 || xx >= width) continue;
                        const A wt = (dy ? p.lh : A(1) - p.lh) * (dx ? p.lw : A(1) - p.lw);
                        const index_t pix = yy * width + xx;
                        atomic_add_fixed(fixed + (plane - n0 * channels) * hw + pix, grad + plane * hw + pix,
                                         wt * gv, scale);
                    }
                }
            }
        }
    }
}

// Offset and mask gradients: a gather. One thread per (image, offset group, kernel point,
// position) sums over the group's channels, so nothing is accumulated by two threads.
// closed_low: the "torchvision" border rule (the derivative lives on [-1, H) x [-1, W));
// otherwise the "mmcv" rule (only on the open box).
template <typename T>
__global__ void dcn_col2im_coord(const T* __restrict__ gcols, const T* __restrict__ input,
                                 const T* __restrict__ offset, const T* __restrict__ mask, int use_mask,
                                 int closed_low, DCN_GEOMETRY, T* __restrict__ grad_offset,
                                 T* __restrict__ grad_mask) {
    typedef typename acc<T>::type A;
    const index_t L = out_h * out_w, K = (index_t)kh * kw, bL = batch * L;
    const index_t per_group = channels / offset_groups;
    CUDEFORM_LOOP(idx, offset_groups * K * bL) {
        const index_t l = idx % L, n = (idx / L) % batch, gk = idx / bL;
        const index_t g = gk / K, k = gk % K, i = k / kw, j = k % kw;
        const index_t y = l / out_w, x = l % out_w, img = n0 + n;
        const index_t oi = ((img * offset_groups * K + gk) * 2) * L + l;
        const index_t mi = (img * offset_groups * K + gk) * L + l;
        const A h = A(y * sh - ph + i * dh) + to_acc(offset[oi]);
        const A w = A(x * sw - pw + j * dw) + to_acc(offset[oi + L]);
        const A m = use_mask ? to_acc(mask[mi]) : A(1);
        A grad_h = A(0), grad_w = A(0), grad_m = A(0);
        const bool live = (h > A(-1) || (closed_low && h == A(-1))) && h < A(height)
                       && (w > A(-1) || (closed_low && w == A(-1))) && w < A(width);
        if (live) {
            Corners<A> p(h, w);
            for (index_t c = g * per_group; c < (g + 1) * per_group; ++c) {
                const T* plane = input + (img * channels + c) * height * width;
                const A v00 = pixel<A>(plane, height, width, p.y0, p.x0);
                const A v01 = pixel<A>(plane, height, width, p.y0, p.x0 + 1);
                const A v10 = pixel<A>(plane, height, width, p.y0 + 1, p.x0);
                const A v11 = pixel<A>(plane, height, width, p.y0 + 1, p.x0 + 1);
                const A gc = to_acc(gcols[(c * K + k) * bL + n * L + l]);
                grad_h += gc * ((A(1) - p.lw) * (v10 - v00) + p.lw * (v11 - v01));
                grad_w += gc * ((A(1) - p.lh) * (v01 - v00) + p.lh * (v11 - v10));
                grad_m += gc * ((A(1) - p.lh) * ((A(1) - p.lw) * v00 + p.lw * v01)
                                + p.lh * ((A(1) - p.lw) * v10 + p.lw * v11));
            }
        }
        grad_offset[oi] = from_acc<T>(m * grad_h);
        grad_offset[oi + L] = from_acc<T>(m * grad_w);
        if (use_mask) grad_mask[mi] = from_acc<T>(grad_m);
    }
}

// (C_out, batch, L) GEMM result -> images n0.. of the (N, C_out, L) output, plus bias.
// In place when batch == 1 (buffer == output + n0 * C_out * L).
template <typename T>
__global__ void dcn_output_epilogue(const T* buffer, const T* __restrict__ bias, int use_bias,
                                    index_t c_out, index_t batch, index_t L, index_t n0, T* out) {
    typedef typename acc<T>::type A;
    CUDEFORM_LOOP(idx, batch * c_out * L) {
        const index_t l = idx % L, o = (idx / L) % c_out, n = idx / (L * c_out);
        A v = to_acc(buffer[(o * batch + n) * L + l]);
        if (use_bias) v += to_acc(bias[o]);
        out[(n0 + n) * c_out * L + o * L + l] = from_acc<T>(v);
    }
}

// Images n0.. of grad_output (N, C_out, L) -> a (C_out, batch, L) GEMM operand.
template <typename T>
__global__ void dcn_gather_grad_output(const T* __restrict__ grad_output, index_t c_out, index_t batch,
                                       index_t L, index_t n0, T* __restrict__ buffer) {
    CUDEFORM_LOOP(idx, batch * c_out * L) {
        const index_t l = idx % L, n = (idx / L) % batch, o = idx / (L * batch);
        buffer[idx] = grad_output[(n0 + n) * c_out * L + o * L + l];
    }
}
