// Deformable Kernels (global and local DK): the input is read on the rigid grid, the kernel is
// resampled from its scope. Host code: cudeform/cuda/deform_kernel_conv.py. CPU twin:
// cudeform/cpu/deform_kernel_conv.py.
//
// weight (C_out, Cg, S_h, S_w) is the scope, Cg = C_in / groups. Kernel point (i, j) of offset
// group g reads it with bilinear_zero at (i + (S_h - kh)/2 + dh, j + (S_w - kw)/2 + dw). Output
// channel o belongs to weight group o / (C_out / groups) and to offset group o / (C_out / G).
//
// Global DK: dk_resample samples one kernel per image, (N, C_out, Cg, K), K = kh * kw; the
// convolution is dk_im2col plus one strided-batched GEMM (host) or the direct dk_global_conv.
// Its backward goes through the resampled kernels' gradient, also (N, C_out, Cg, K).
// Local DK: fused kernels that sample the scope at every output position; nothing per position
// is stored.
//
// Every sum is a gather or a block reduction with a fixed order: the backward is bitwise
// reproducible and uses no atomics. Templated on the storage type T; sums in acc<T>::type.
#include "common.cuh"

using namespace cudeform;

// The geometry every kernel of this file takes, in this order (see _geometry_args in the host).
#define DK_GEOMETRY                                                                                \
    index_t batch, index_t channels, index_t height, index_t width, index_t c_out, index_t groups, \
    index_t offset_groups, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,        \
    index_t out_h, index_t out_w, index_t scope_h, index_t scope_w

#define DK_GEO                                                                                     \
    const DkGeometry geo{batch, channels, height, width, c_out, groups, offset_groups, kh, kw, sh, \
                         sw, ph, pw, dh, dw, out_h, out_w, scope_h, scope_w}

struct DkGeometry {
    index_t batch, channels, height, width, c_out, groups, offset_groups;
    int kh, kw, sh, sw, ph, pw, dh, dw;
    index_t out_h, out_w, scope_h, scope_w;
    // Channel counts per group, derived once per thread: a 64-bit division is a long
    // subroutine on the GPU, and the light kernels here would spend most of their time in it.
    index_t cg_, og_, opg_;

    __device__ __forceinline__ DkGeometry(DK_GEOMETRY)
        : batch(batch), channels(channels), height(height), width(width), c_out(c_out), groups(groups),
          offset_groups(offset_groups), kh(kh), kw(kw), sh(sh), sw(sw), ph(ph), pw(pw), dh(dh), dw(dw),
          out_h(out_h), out_w(out_w), scope_h(scope_h), scope_w(scope_w),
          cg_(fast_div(channels, groups)), og_(fast_div(c_out, groups)), opg_(fast_div(c_out, offset_groups)) {}

    __device__ __forceinline__ index_t K() const { return (index_t)kh * kw; }
    __device__ __forceinline__ index_t L() const { return out_h * out_w; }
    __device__ __forceinline__ index_t hw() const { return height * width; }
    __device__ __forceinline__ index_t scope() const { return scope_h * scope_w; }
    __device__ __forceinline__ index_t cg() const { return cg_; }
    __device__ __forceinline__ index_t og() const { return og_; }
    __device__ __forceinline__ index_t opg() const { return opg_; }

    // Where kernel point k, moved by its offsets (dh at off[0], dw at off[step]), reads the
    // scope: the kh x kw grid is centred in the S_h x S_w scope.
    template <typename A, typename T>
    __device__ __forceinline__ void scope_point(index_t k, const T* off, index_t step, A& h, A& w) const {
        const int ki = (int)k;
        h = A(2 * (ki / kw) + scope_h - kh) / A(2) + to_acc(off[0]);
        w = A(2 * (ki % kw) + scope_w - kw) / A(2) + to_acc(off[step]);
    }

    __device__ __forceinline__ index_t in_row(index_t y, int i) const { return y * sh - ph + (index_t)i * dh; }
    __device__ __forceinline__ index_t in_col(index_t x, int j) const { return x * sw - pw + (index_t)j * dw; }

    // The output row whose kernel row i reads input row iy; false when there is none (stride).
    __device__ __forceinline__ bool out_row(index_t iy, int i, index_t& y) const {
        const index_t t = iy + ph - (index_t)i * dh;
        if (t < 0) return false;
        y = fast_div(t, sh);
        return y * sh == t && y < out_h;
    }
    __device__ __forceinline__ bool out_col(index_t ix, int j, index_t& x) const {
        const index_t t = ix + pw - (index_t)j * dw;
        if (t < 0) return false;
        x = fast_div(t, sw);
        return x * sw == t && x < out_w;
    }
};

// ---------------------------------------------------------------------------------------------
// The kernel values of the direct kernels. with_point(n, o, i, j, l, f) calls f(value), where
// value(c) is kernel point (i, j) of output channel o of image n, at output position l, for
// channel c of o's weight group; it does not call f when that kernel point is 0 for every c.
// ---------------------------------------------------------------------------------------------

// Global DK: the kernels dk_resample sampled, (N, C_out, Cg, K).
template <typename T>
struct ResampledKernels {
    const T* kernels;
    DkGeometry geo;

    template <typename F>
    __device__ __forceinline__ void with_point(index_t n, index_t o, int i, int j, index_t, F f) const {
        const index_t K = geo.K();
        const T* first = kernels + (n * geo.c_out + o) * geo.cg() * K + (index_t)i * geo.kw + j;
        f([&](index_t c) { return to_acc(first[c * K]); });
    }
};

// Local DK: the scope sampled with the offsets of output position l. The taps are computed once
// and applied to the Cg planes of the output channel.
template <typename T>
struct SampledKernels {
    typedef typename acc<T>::type A;
    const T* weight;
    const T* offset;
    DkGeometry geo;

    template <typename F>
    __device__ __forceinline__ void with_point(index_t n, index_t o, int i, int j, index_t l, F f) const {
        const index_t L = geo.L(), k = (index_t)i * geo.kw + j, g = fast_div(o, geo.opg());
        A h, w;
        geo.scope_point(k, offset + ((n * geo.offset_groups + g) * geo.K() + k) * 2 * L + l, L, h, w);
        if (!in_open_box(h, w, geo.scope_h, geo.scope_w)) return;
        const BilinearTaps<A> taps(h, w, geo.scope_h, geo.scope_w);
        const index_t S = geo.scope();
        const T* planes = weight + o * geo.cg() * S;
        f([&](index_t c) { return taps.sample(planes + c * S); });
    }
};

// out[n, o, l] = bias[o] + sum over c, (i, j) of input[n, first + c, rigid point] * value(c).
// One thread per output element.
template <typename T, typename Kernels>
__device__ __forceinline__ void dk_conv_body(const T* input, const Kernels& kernels, const T* bias, int use_bias,
                                             const DkGeometry& geo, T* out) {
    typedef typename acc<T>::type A;
    const index_t L = geo.L(), hw = geo.hw(), cg = geo.cg();
    CUDEFORM_LOOP(idx, geo.batch * geo.c_out * L) {
        const index_t no = fast_div(idx, L), l = idx - no * L;
        const index_t n = fast_div(no, geo.c_out), o = no - n * geo.c_out;
        const index_t y = fast_div(l, geo.out_w), x = l - y * geo.out_w;
        const T* planes = input + (n * geo.channels + fast_div(o, geo.og()) * cg) * hw;
        A sum = use_bias ? to_acc(bias[o]) : A(0);
        for (int i = 0; i < geo.kh; ++i) {
            const index_t iy = geo.in_row(y, i);
            if (iy < 0 || iy >= geo.height) continue;
            for (int j = 0; j < geo.kw; ++j) {
                const index_t ix = geo.in_col(x, j);
                if (ix < 0 || ix >= geo.width) continue;
                const T* px = planes + iy * geo.width + ix;
                kernels.with_point(n, o, i, j, l, [&](auto value) {
                    for (index_t c = 0; c < cg; ++c) sum += to_acc(px[c * hw]) * value(c);
                });
            }
        }
        out[idx] = from_acc<T>(sum);
    }
}

// grad_input[n, c_in, iy, ix] = sum over the outputs o of c_in's weight group and the (i, j, l)
// that read (iy, ix) of grad_output[n, o, l] * value(c). A gather: one thread per input element.
template <typename T, typename Kernels>
__device__ __forceinline__ void dk_input_grad_body(const T* grad_output, const Kernels& kernels,
                                                   const DkGeometry& geo, T* grad_input) {
    typedef typename acc<T>::type A;
    const index_t L = geo.L(), hw = geo.hw(), cg = geo.cg(), og = geo.og();
    CUDEFORM_LOOP(idx, geo.batch * geo.channels * hw) {
        const index_t nc = fast_div(idx, hw), p = idx - nc * hw;
        const index_t iy = fast_div(p, geo.width), ix = p - iy * geo.width;
        const index_t n = fast_div(nc, geo.channels), c_in = nc - n * geo.channels;
        const index_t wg = fast_div(c_in, cg), c = c_in - wg * cg;
        A sum = A(0);
        for (int i = 0; i < geo.kh; ++i) {
            index_t y;
            if (!geo.out_row(iy, i, y)) continue;
            for (int j = 0; j < geo.kw; ++j) {
                index_t x;
                if (!geo.out_col(ix, j, x)) continue;
                const index_t l = y * geo.out_w + x;
                const T* go = grad_output + (n * geo.c_out + wg * og) * L + l;
                for (index_t o = 0; o < og; ++o)
                    kernels.with_point(n, wg * og + o, i, j, l,
                                       [&](auto value) { sum += to_acc(go[o * L]) * value(c); });
            }
        }
        grad_input[idx] = from_acc<T>(sum);
    }
}

// ---------------------------------------------------------------------------------------------
// Global DK
// ---------------------------------------------------------------------------------------------

// kernels[n, o, c, k]: the scope of (o, c) sampled at kernel point k moved by image n's offset.
template <typename T>
__global__ void dk_resample(const T* __restrict__ weight, const T* __restrict__ offset, DK_GEOMETRY,
                            T* __restrict__ kernels) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t K = geo.K(), occ = c_out * geo.cg(), S = geo.scope();
    CUDEFORM_LOOP(idx, batch * occ * K) {
        const index_t r = fast_div(idx, K), k = idx - r * K;
        const index_t n = fast_div(r, occ), oc = r - n * occ;
        const index_t g = fast_div(fast_div(oc, geo.cg()), geo.opg());
        A h, w;
        geo.scope_point(k, offset + 2 * ((n * offset_groups + g) * K + k), 1, h, w);
        kernels[idx] = from_acc<T>(bilinear_zero<A>(weight + oc * S, scope_h, scope_w, h, w));
    }
}

// The direct convolution with the resampled kernels, for small Cg * K (depthwise), where a GEMM
// would have a handful of rows.
template <typename T>
__global__ void dk_global_conv(const T* __restrict__ input, const T* __restrict__ kernels,
                               const T* __restrict__ bias, int use_bias, DK_GEOMETRY, T* __restrict__ out) {
    DK_GEO;
    dk_conv_body(input, ResampledKernels<T>{kernels, geo}, bias, use_bias, geo, out);
}

template <typename T>
__global__ void dk_global_input_grad(const T* __restrict__ grad_output, const T* __restrict__ kernels, DK_GEOMETRY,
                                     T* __restrict__ grad_input) {
    DK_GEO;
    dk_input_grad_body(grad_output, ResampledKernels<T>{kernels, geo}, geo, grad_input);
}

// Columns of the rigid grid for `batch` images: cols[n, c * K + k, l], zero padding. One thread
// per (image, channel, position), so a warp writes contiguous stretches of a row.
template <typename T>
__global__ void dk_im2col(const T* __restrict__ input, DK_GEOMETRY, T* __restrict__ cols) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t L = geo.L(), K = geo.K(), hw = geo.hw();
    CUDEFORM_LOOP(idx, batch * channels * L) {
        const index_t nc = fast_div(idx, L), l = idx - nc * L;
        const index_t y = fast_div(l, out_w), x = l - y * out_w;
        const T* plane = input + nc * hw;
        T* col = cols + nc * K * L + l;
        for (int i = 0; i < kh; ++i) {
            const index_t iy = geo.in_row(y, i);
            for (int j = 0; j < kw; ++j) {
                const index_t ix = geo.in_col(x, j);
                const bool inside = iy >= 0 && iy < height && ix >= 0 && ix < width;
                col[((index_t)i * kw + j) * L] = inside ? plane[iy * width + ix] : from_acc<T>(A(0));
            }
        }
    }
}

// The input gradient from the columns' gradient: a gather, one thread per input element.
template <typename T>
__global__ void dk_col2im(const T* __restrict__ cols, DK_GEOMETRY, T* __restrict__ grad_input) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t L = geo.L(), K = geo.K(), hw = geo.hw();
    CUDEFORM_LOOP(idx, batch * channels * hw) {
        const index_t nc = fast_div(idx, hw), p = idx - nc * hw;
        const index_t iy = fast_div(p, width), ix = p - iy * width;
        const T* col = cols + nc * K * L;
        A sum = A(0);
        for (int i = 0; i < kh; ++i) {
            index_t y;
            if (!geo.out_row(iy, i, y)) continue;
            for (int j = 0; j < kw; ++j) {
                index_t x;
                if (geo.out_col(ix, j, x)) sum += to_acc(col[((index_t)i * kw + j) * L + y * out_w + x]);
            }
        }
        grad_input[idx] = from_acc<T>(sum);
    }
}

// The resampled kernels' gradient of the direct path: grad_kernels[n, o, c, k] = sum over l of
// grad_output[n, o, l] * input[n, c_in, rigid point]. One block per (n, o, c) (a multiple of 32
// threads), a fixed-order block sum per kernel point.
template <typename T>
__global__ void dk_global_kernel_grad(const T* __restrict__ grad_output, const T* __restrict__ input, DK_GEOMETRY,
                                      typename acc<T>::type* __restrict__ grad_kernels) {
    typedef typename acc<T>::type A;
    DK_GEO;
    __shared__ A scratch[WARP_SIZE];
    const index_t L = geo.L(), K = geo.K(), hw = geo.hw(), cg = geo.cg();
    for (index_t b = blockIdx.x; b < batch * c_out * cg; b += gridDim.x) {
        const index_t no = fast_div(b, cg), c = b - no * cg, n = fast_div(no, c_out), o = no - n * c_out;
        const T* go = grad_output + no * L;
        const T* plane = input + (n * channels + fast_div(o, geo.og()) * cg + c) * hw;
        for (int i = 0; i < kh; ++i) {
            for (int j = 0; j < kw; ++j) {
                A part = A(0);
                for (index_t l = threadIdx.x; l < L; l += blockDim.x) {
                    const index_t y = fast_div(l, out_w), x = l - y * out_w;
                    const index_t iy = geo.in_row(y, i), ix = geo.in_col(x, j);
                    if (iy >= 0 && iy < height && ix >= 0 && ix < width)
                        part += to_acc(go[l]) * to_acc(plane[iy * width + ix]);
                }
                part = block_sum(part, scratch);
                if (threadIdx.x == 0) grad_kernels[b * K + (index_t)i * kw + j] = part;
            }
        }
    }
}

// grad_offset[n, 2 * (g*K + k) + {0, 1}] = sum over the (o, c) of offset group g of
// grad_kernels[n, o, c, k] * d kernels[n, o, c, k] / d(dh, dw). One block per (n, g, k), of up to
// 1024 threads (the bound keeps the registers within what such a block may use).
template <typename T>
__global__ void __launch_bounds__(1024) dk_global_offset_grad(const typename acc<T>::type* __restrict__ grad_kernels,
                                      const T* __restrict__ weight, const T* __restrict__ offset, DK_GEOMETRY,
                                      T* __restrict__ grad_offset) {
    typedef typename acc<T>::type A;
    DK_GEO;
    __shared__ A scratch[WARP_SIZE];
    const index_t K = geo.K(), S = geo.scope(), occ = c_out * geo.cg(), terms = geo.opg() * geo.cg();
    for (index_t b = blockIdx.x; b < batch * offset_groups * K; b += gridDim.x) {
        const index_t ng = fast_div(b, K), k = b - ng * K, n = fast_div(ng, offset_groups), g = ng - n * offset_groups;
        A h, w;
        geo.scope_point(k, offset + 2 * b, 1, h, w);
        A grad_h = A(0), grad_w = A(0);
        for (index_t t = threadIdx.x; t < terms; t += blockDim.x) {
            const index_t oc = g * terms + t;  // the (o, c) of offset group g are contiguous
            A d_h, d_w;
            bilinear_zero_position_grad(weight + oc * S, scope_h, scope_w, h, w, d_h, d_w);
            const A gk = grad_kernels[(n * occ + oc) * K + k];
            grad_h += gk * d_h;
            grad_w += gk * d_w;
        }
        grad_h = block_sum(grad_h, scratch);
        grad_w = block_sum(grad_w, scratch);
        if (threadIdx.x == 0) {
            grad_offset[2 * b] = from_acc<T>(grad_h);
            grad_offset[2 * b + 1] = from_acc<T>(grad_w);
        }
    }
}

// taps[n, g, k, s]: the weight of scope element s in kernel point k of (n, g), i.e. the
// resampling as a sparse (K, S) matrix per (n, g). `taps` must be zeroed; one thread per row.
template <typename T>
__global__ void dk_global_taps(const T* __restrict__ offset, DK_GEOMETRY, typename acc<T>::type* __restrict__ taps) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t K = geo.K(), S = geo.scope();
    CUDEFORM_LOOP(idx, batch * offset_groups * K) {
        A h, w;
        geo.scope_point(idx - fast_div(idx, K) * K, offset + 2 * idx, 1, h, w);
        if (!in_open_box(h, w, scope_h, scope_w)) continue;
        A* row = taps + idx * S;
        BilinearTaps<A>(h, w, scope_h, scope_w).for_each([&](index_t s, A wt) { row[s] = wt; });
    }
}

// grad_weight[o, c, s] = sum over n, k of grad_kernels[n, o, c, k] * taps[n, g, k, s]. A gather,
// one thread per weight element: the N*K-term sums need no atomics.
template <typename T>
__global__ void dk_global_weight_grad(const typename acc<T>::type* __restrict__ grad_kernels,
                                      const typename acc<T>::type* __restrict__ taps, DK_GEOMETRY,
                                      T* __restrict__ grad_weight) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t K = geo.K(), S = geo.scope(), occ = c_out * geo.cg();
    CUDEFORM_LOOP(idx, occ * S) {
        const index_t oc = fast_div(idx, S), s = idx - oc * S;
        const index_t g = fast_div(fast_div(oc, geo.cg()), geo.opg());
        A sum = A(0);
        for (index_t n = 0; n < batch; ++n) {
            const A* gk = grad_kernels + (n * occ + oc) * K;
            const A* tp = taps + (n * offset_groups + g) * K * S + s;
            for (index_t k = 0; k < K; ++k) sum += gk[k] * tp[k * S];
        }
        grad_weight[idx] = from_acc<T>(sum);
    }
}

// ---------------------------------------------------------------------------------------------
// Local DK
// ---------------------------------------------------------------------------------------------

template <typename T>
__global__ void dk_local_conv(const T* __restrict__ input, const T* __restrict__ weight, const T* __restrict__ offset,
                              const T* __restrict__ bias, int use_bias, DK_GEOMETRY, T* __restrict__ out) {
    DK_GEO;
    dk_conv_body(input, SampledKernels<T>{weight, offset, geo}, bias, use_bias, geo, out);
}

template <typename T>
__global__ void dk_local_input_grad(const T* __restrict__ grad_output, const T* __restrict__ weight,
                                    const T* __restrict__ offset, DK_GEOMETRY, T* __restrict__ grad_input) {
    DK_GEO;
    dk_input_grad_body(grad_output, SampledKernels<T>{weight, offset, geo}, geo, grad_input);
}

// grad_offset[n, 2 * (g*K + k) + {0, 1}, l] = sum over the (o, c) of offset group g of
// grad_output[n, o, l] * input[n, c_in, rigid point] * d scope sample / d(dh, dw). A gather, one
// thread per (n, g, k, l).
template <typename T>
__global__ void dk_local_offset_grad(const T* __restrict__ grad_output, const T* __restrict__ input,
                                     const T* __restrict__ weight, const T* __restrict__ offset, DK_GEOMETRY,
                                     T* __restrict__ grad_offset) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t L = geo.L(), K = geo.K(), S = geo.scope(), hw = geo.hw(), cg = geo.cg(), opg = geo.opg();
    CUDEFORM_LOOP(idx, batch * offset_groups * K * L) {
        const index_t ngk = fast_div(idx, L), l = idx - ngk * L;
        const index_t ng = fast_div(ngk, K), k = ngk - ng * K;
        const index_t n = fast_div(ng, offset_groups), g = ng - n * offset_groups;
        const index_t y = fast_div(l, out_w), x = l - y * out_w;
        const index_t iy = geo.in_row(y, (int)k / kw), ix = geo.in_col(x, (int)k % kw);
        const index_t oi = 2 * ngk * L + l;
        A grad_h = A(0), grad_w = A(0);
        if (iy >= 0 && iy < height && ix >= 0 && ix < width) {
            A h, w;
            geo.scope_point(k, offset + oi, L, h, w);
            for (index_t o = g * opg; o < (g + 1) * opg; ++o) {
                const A go = to_acc(grad_output[(n * c_out + o) * L + l]);
                const T* px = input + (n * channels + fast_div(o, geo.og()) * cg) * hw + iy * width + ix;
                for (index_t c = 0; c < cg; ++c) {
                    A d_h, d_w;
                    bilinear_zero_position_grad(weight + (o * cg + c) * S, scope_h, scope_w, h, w, d_h, d_w);
                    const A v = go * to_acc(px[c * hw]);
                    grad_h += v * d_h;
                    grad_w += v * d_w;
                }
            }
        }
        grad_offset[oi] = from_acc<T>(grad_h);
        grad_offset[oi + L] = from_acc<T>(grad_w);
    }
}

// Shared memory of dk_local_weight_grad's per-thread sums.
#define DK_PRIVATE_BYTES 32768

// The weight gradient, pass 1: grad_weight[o, c, s] is a sum over the N * L * K sampled points
// of grad_output[n, o, l] * input[n, c_in, rigid point] * (weight of scope element s in the
// sample). Block b sums the positions of chunk b / (C_out * Cg) for pair (o, c) = b % (C_out * Cg)
// into partial[chunk, o, c, s]: each thread adds into its own column of shared memory (no
// atomics, no contention), then the columns are summed in a fixed order. A scope larger than
// the shared memory takes several passes over the positions, a tile of elements at a time.
template <typename T>
__global__ void dk_local_weight_grad(const T* __restrict__ grad_output, const T* __restrict__ input,
                                     const T* __restrict__ offset, index_t chunks, DK_GEOMETRY,
                                     typename acc<T>::type* __restrict__ partial) {
    typedef typename acc<T>::type A;
    DK_GEO;
    __shared__ __align__(16) unsigned char private_bytes[DK_PRIVATE_BYTES];
    A* const sums = reinterpret_cast<A*>(private_bytes);
    // One padding element per row: in the final row sums, the lanes of a warp hit distinct banks.
    const index_t row = blockDim.x + 1;
    const index_t S = geo.scope(), L = geo.L(), K = geo.K(), hw = geo.hw(), cg = geo.cg();
    const index_t tile = min(S, (index_t)(DK_PRIVATE_BYTES / sizeof(A)) / row);
    const index_t pairs = c_out * cg, positions = batch * L, per_chunk = (positions + chunks - 1) / chunks;
    A* const mine = sums + threadIdx.x;
    for (index_t b = blockIdx.x; b < pairs * chunks; b += gridDim.x) {
        const index_t chunk = b / pairs, pair = b - chunk * pairs;
        const index_t o = fast_div(pair, cg), c = pair - o * cg, g = fast_div(o, geo.opg());
        const index_t c_in = fast_div(o, geo.og()) * cg + c;
        const index_t begin = chunk * per_chunk, end = min(positions, begin + per_chunk);
        for (index_t s0 = 0; s0 < S; s0 += tile) {
            const index_t count = min(tile, S - s0);
            for (index_t t = 0; t < count; ++t) mine[t * row] = A(0);
            for (index_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
                const index_t n = fast_div(p, L), l = p - n * L;
                const index_t y = fast_div(l, out_w), x = l - y * out_w;
                const A go = to_acc(grad_output[(n * c_out + o) * L + l]);
                const T* plane = input + (n * channels + c_in) * hw;
                const T* off = offset + (n * offset_groups + g) * K * 2 * L + l;
                for (int i = 0; i < kh; ++i) {
                    const index_t iy = geo.in_row(y, i);
                    if (iy < 0 || iy >= height) continue;
                    for (int j = 0; j < kw; ++j) {
                        const index_t ix = geo.in_col(x, j), k = (index_t)i * kw + j;
                        if (ix < 0 || ix >= width) continue;
                        A h, w;
                        geo.scope_point(k, off + 2 * k * L, L, h, w);
                        if (!in_open_box(h, w, scope_h, scope_w)) continue;
                        const A v = go * to_acc(plane[iy * width + ix]);
                        BilinearTaps<A>(h, w, scope_h, scope_w).for_each([&](index_t s, A wt) {
                            if (s >= s0 && s < s0 + count) mine[(s - s0) * row] += wt * v;
                        });
                    }
                }
            }
            __syncthreads();
            for (index_t t = threadIdx.x; t < count; t += blockDim.x) {
                A total = A(0);
                for (index_t r = 0; r < blockDim.x; ++r) total += sums[t * row + r];
                partial[(chunk * pairs + pair) * S + s0 + t] = total;
            }
            __syncthreads();
        }
    }
}

// Pass 2: out[e] = sum over the chunks of partial[chunk, e], in chunk order.
template <typename T>
__global__ void dk_sum_partials(const typename acc<T>::type* __restrict__ partial, index_t chunks, index_t n,
                                T* __restrict__ out) {
    typedef typename acc<T>::type A;
    CUDEFORM_LOOP(idx, n) {
        A total = A(0);
        for (index_t chunk = 0; chunk < chunks; ++chunk) total += partial[chunk * n + idx];
        out[idx] = from_acc<T>(total);
    }
}
