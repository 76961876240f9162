// Deformable convolution (DCN v1/v2): im2col / col2im kernels around cuBLAS GEMMs.
// Host code: cudeform/cuda/deform_conv.py. CPU twin: cudeform/cpu/deform_conv.py.
//
// A chunk of `batch` images starting at image `n0` is processed at a time. Its columns are a
// (C_in * kh * kw, batch * pitch) matrix, row c * K + k holding the (masked) samples of input
// channel c at kernel point k, image n in columns [n * pitch, n * pitch + L), L = H_out * W_out
// (the forward pads pitch for aligned GEMM rows; the backward uses pitch = L), so one GEMM per
// weight group multiplies them.
// Every kernel is templated on the storage type T and computes in acc<T>::type.
#include "common.cuh"

using namespace cudeform;

// The geometry every kernel of this file takes, in this order (see _geometry_args in the host).
#define DCN_GEOMETRY                                                                            \
    index_t batch, index_t n0, index_t channels, index_t height, index_t width,                \
    index_t offset_groups, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,     \
    index_t out_h, index_t out_w

// The work item of im2col and col2im: a run of `run` channels (inside one offset group) of
// one image at one output position. The sampling point of a kernel point, and so its
// bilinear taps, is shared by the run's channels: computed once, applied `run` times.
struct DcnSite {
    index_t l, n, y, x, c0, g, img;
    __device__ __forceinline__ DcnSite(index_t idx, int run, DCN_GEOMETRY) {
        const index_t L = out_h * out_w, bL = batch * L;
        const index_t r = fast_div(idx, bL), rest = idx - r * bL;
        n = fast_div(rest, L);
        l = rest - n * L;
        y = fast_div(l, out_w);
        x = l - y * out_w;
        c0 = r * run;
        g = fast_div(c0, channels / offset_groups);
        img = n0 + n;
    }
};

#define DCN_GEOMETRY_ARGS                                                                       \
    batch, n0, channels, height, width, offset_groups, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w

// Sampling position of kernel point (i, j) at a site, and its mask value (1 without a mask).
template <typename A, typename T>
__device__ __forceinline__ void dcn_point(const T* offset, const T* mask, int use_mask, const DcnSite& s,
                                          int i, int j, DCN_GEOMETRY, A& h, A& w, A& m) {
    const index_t L = out_h * out_w, K = (index_t)kh * kw, k = (index_t)i * kw + j;
    const index_t gk = (s.img * offset_groups + s.g) * K + k;
    h = A(s.y * sh - ph + (index_t)i * dh) + to_acc(offset[2 * gk * L + s.l]);
    w = A(s.x * sw - pw + (index_t)j * dw) + to_acc(offset[(2 * gk + 1) * L + s.l]);
    m = use_mask ? to_acc(mask[gk * L + s.l]) : A(1);
}

// Columns: cols[(c * K + k), n * pitch + l] = mask * sample; the padding columns
// [L, pitch) of each image are left as they are (their GEMM results are never read). Work items
// are (run, image, position) with the position fastest, so a warp writes contiguous stretches
// of a columns row.
template <typename T>
__global__ void dcn_im2col(const T* __restrict__ input, const T* __restrict__ offset,
                           const T* __restrict__ mask, int use_mask, DCN_GEOMETRY, int run, index_t pitch,
                           T* __restrict__ cols) {
    typedef typename acc<T>::type A;
    const index_t L = out_h * out_w, K = (index_t)kh * kw, bL = batch * L, bP = batch * pitch, hw = height * width;
    CUDEFORM_LOOP(idx, (channels / run) * bL) {
        const DcnSite s(idx, run, DCN_GEOMETRY_ARGS);
        const T* plane = input + (s.img * channels + s.c0) * hw;
        T* col = cols + s.c0 * K * bP + s.n * pitch + s.l;
        for (int i = 0; i < kh; ++i) {
            for (int j = 0; j < kw; ++j) {
                const index_t k = (index_t)i * kw + j;
                A h, w, m;
                dcn_point(offset, mask, use_mask, s, i, j, DCN_GEOMETRY_ARGS, h, w, m);
                if (!in_open_box(h, w, height, width)) {
                    for (int c = 0; c < run; ++c) col[(c * K + k) * bP] = from_acc<T>(A(0));
                    continue;
                }
                const BilinearTaps<A> taps(h, w, height, width);
                for (int c = 0; c < run; ++c) col[(c * K + k) * bP] = from_acc<T>(m * taps.sample(plane + c * hw));
            }
        }
    }
}

// Calls f(channel offset c, taps, masked column gradient) for every channel of the site's run
// and every kernel point whose sample sees the image: the shared body of the input-gradient
// kernels.
template <typename T, typename F>
__device__ __forceinline__ void dcn_col2im_site(const T* gcols, const T* offset, const T* mask, int use_mask,
                                                const DcnSite& s, int run, DCN_GEOMETRY, F f) {
    typedef typename acc<T>::type A;
    const index_t L = out_h * out_w, K = (index_t)kh * kw, bL = batch * L;
    const T* gcol = gcols + s.c0 * K * bL + s.n * L + s.l;
    for (int i = 0; i < kh; ++i) {
        for (int j = 0; j < kw; ++j) {
            const index_t k = (index_t)i * kw + j;
            A h, w, m;
            dcn_point(offset, mask, use_mask, s, i, j, DCN_GEOMETRY_ARGS, h, w, m);
            if (!in_open_box(h, w, height, width)) continue;
            const BilinearTaps<A> taps(h, w, height, width);
            for (int c = 0; c < run; ++c) f(c, taps, m * to_acc(gcol[(c * K + k) * bL]));
        }
    }
}

// Input gradient, default mode: float atomics into `grad` (N, C, H, W) of type acc<T>::type.
template <typename T>
__global__ void dcn_col2im(const T* __restrict__ gcols, const T* __restrict__ offset,
                           const T* __restrict__ mask, int use_mask, DCN_GEOMETRY, int run,
                           typename acc<T>::type* __restrict__ grad) {
    typedef typename acc<T>::type A;
    const index_t hw = height * width;
    CUDEFORM_LOOP(idx, (channels / run) * batch * out_h * out_w) {
        const DcnSite s(idx, run, DCN_GEOMETRY_ARGS);
        A* planes = grad + (s.img * channels + s.c0) * hw;
        dcn_col2im_site(gcols, offset, mask, use_mask, s, run, DCN_GEOMETRY_ARGS,
                        [&](int c, const BilinearTaps<A>& taps, A gv) {
                            taps.for_each([&](index_t p, A wt) { atomic_add(planes + c * hw + p, wt * gv); });
                        });
    }
}

// Deterministic mode, pass 1: the largest finite |mask * column gradient| of the chunk, over
// every kernel point, those whose sample misses the image included: a bound is all the fixed
// point needs, and without the sampling positions this is a plain read of the columns (a pass
// that located the samples took 3-4x as long in fp16 on an H200). A warp walks a columns row,
// channel c's kernel point k of image n, beside its mask row. Launch few enough threads that
// each reads many rows.
template <typename T>
__global__ void dcn_col2im_max_abs(const T* __restrict__ gcols, const T* __restrict__ mask, int use_mask,
                                   index_t batch, index_t n0, index_t channels, index_t offset_groups,
                                   index_t K, index_t L, unsigned int* __restrict__ max_abs_bits) {
    typedef typename acc<T>::type A;
    const index_t rows = channels * K * batch, per_group = channels / offset_groups;
    const index_t warps = (index_t)gridDim.x * blockDim.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    A local = A(0);
    for (index_t r = ((index_t)blockIdx.x * blockDim.x + threadIdx.x) / WARP_SIZE; r < rows; r += warps) {
        const index_t ck = fast_div(r, batch), n = r - ck * batch, c = fast_div(ck, K), k = ck - c * K;
        const T* g = gcols + r * L;
        const T* m = mask + (((n0 + n) * offset_groups + fast_div(c, per_group)) * K + k) * L;
        for (index_t l = lane; l < L; l += WARP_SIZE) {
            A v = to_acc(g[l]);
            if (use_mask) v *= to_acc(m[l]);
            keep_max_abs(local, v);
        }
    }
    warp_atomic_max_abs(max_abs_bits, local);
}

// Deterministic mode, pass 2: fixed-point atomics into `fixed` (batch, C, H, W) for the chunk;
// non-finite contributions go to `grad` (N, C, H, W) as in the default mode.
template <typename T>
__global__ void dcn_col2im_fixed(const T* __restrict__ gcols, const T* __restrict__ offset,
                                 const T* __restrict__ mask, int use_mask, DCN_GEOMETRY, int run,
                                 const unsigned int* __restrict__ max_abs_bits,
                                 unsigned long long* __restrict__ fixed,
                                 typename acc<T>::type* __restrict__ grad) {
    typedef typename acc<T>::type A;
    const double scale = fixed_point_scale(*max_abs_bits, (index_t)kh * kw * out_h * out_w);
    const index_t hw = height * width;
    CUDEFORM_LOOP(idx, (channels / run) * batch * out_h * out_w) {
        const DcnSite s(idx, run, DCN_GEOMETRY_ARGS);
        const index_t plane = s.img * channels + s.c0;
        dcn_col2im_site(gcols, offset, mask, use_mask, s, run, DCN_GEOMETRY_ARGS,
                        [&](int c, const BilinearTaps<A>& taps, A gv) {
                            taps.for_each([&](index_t p, A wt) {
                                atomic_add_fixed(fixed + (plane + c - n0 * channels) * hw + p,
                                                 grad + (plane + c) * hw + p, wt * gv, scale);
                            });
                        });
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
        const index_t gk = fast_div(idx, bL), rest = idx - gk * bL;
        const index_t n = fast_div(rest, L), l = rest - n * L;
        const index_t g = fast_div(gk, K), k = gk - g * K;
        const int i = (int)k / kw, j = (int)k % kw;
        const index_t y = fast_div(l, out_w), x = l - y * out_w, img = n0 + n;
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

// (C_out, batch, pitch) GEMM result -> images n0.. of the (N, C_out, L) output, plus bias.
template <typename T>
__global__ void dcn_output_epilogue(const T* __restrict__ buffer, const T* __restrict__ bias, int use_bias,
                                    index_t c_out, index_t batch, index_t L, index_t pitch, index_t n0,
                                    T* __restrict__ out) {
    typedef typename acc<T>::type A;
    CUDEFORM_LOOP(idx, batch * c_out * L) {
        const index_t r = fast_div(idx, L), l = idx - r * L, n = fast_div(r, c_out), o = r - n * c_out;
        A v = to_acc(buffer[(o * batch + n) * pitch + l]);
        if (use_bias) v += to_acc(bias[o]);
        out[n0 * c_out * L + idx] = from_acc<T>(v);
    }
}

// Images n0.. of grad_output (N, C_out, L) -> a (C_out, batch, L) GEMM operand.
template <typename T>
__global__ void dcn_gather_grad_output(const T* __restrict__ grad_output, index_t c_out, index_t batch,
                                       index_t L, index_t n0, T* __restrict__ buffer) {
    CUDEFORM_LOOP(idx, batch * c_out * L) {
        const index_t r = fast_div(idx, L), l = idx - r * L, o = fast_div(r, batch), n = r - o * batch;
        buffer[idx] = grad_output[(n0 + n) * c_out * L + o * L + l];
    }
}
