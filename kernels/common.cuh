// Shared device code of every cudeform kernel: index type, grid-stride loops, conversions
// between storage and accumulation types, bilinear sampling and atomics.
// The CPU twin of the sampling rules is cudeform/cpu/_bilinear.py.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cudeform {

// Sizes and offsets are 64-bit: N*C*H*W and C*kh*kw*N*H_out*W_out pass 2**31 on real inputs.
typedef long long index_t;

// a / b for non-negative a, b: in 32 bits when both fit. A 64-bit division is a long
// subroutine on the GPU, and index decomposition is most of a light kernel's arithmetic.
__device__ __forceinline__ index_t fast_div(index_t a, index_t b) {
    return ((a | b) >> 31) == 0 ? (index_t)((unsigned)a / (unsigned)b) : a / b;
}

// Every kernel walks its index space with a grid-stride loop, so any grid size is valid and
// the host can cap the grid.
#define CUDEFORM_LOOP(i, n)                                                                    \
    for (::cudeform::index_t i = (::cudeform::index_t)blockIdx.x * blockDim.x + threadIdx.x;   \
         i < (n); i += (::cudeform::index_t)blockDim.x * gridDim.x)

// Accumulation type: float for the half types (there are no half-precision atomics, and
// sums of halves lose too much), the type itself otherwise.
template <typename T> struct acc { typedef T type; };
template <> struct acc<__half> { typedef float type; };
template <> struct acc<__nv_bfloat16> { typedef float type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return v; }

// ---------------------------------------------------------------------------------------------
// Bilinear sampling with zero padding (deformable convolution, Deformable Kernels).
// A point at (h, w) sees the image only inside the open box (-1, H) x (-1, W); there it is the
// bilinear blend of its four integer neighbours (floor, floor + 1), a neighbour outside the
// image counting as 0. NaN coordinates fail every comparison and so read as outside.
// ---------------------------------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ bool in_open_box(A h, A w, index_t height, index_t width) {
    return h > A(-1) && h < A(height) && w > A(-1) && w < A(width);
}

// The four neighbours of a point and its fractional position between them.
template <typename A>
struct Corners {
    index_t y0, x0;
    A lh, lw;
    __device__ __forceinline__ Corners(A h, A w) {
        A fh = floor(h), fw = floor(w);
        y0 = (index_t)fh;
        x0 = (index_t)fw;
        lh = h - fh;
        lw = w - fw;
    }
};

// plane[y, x] as the accumulation type, or 0 outside the plane.
template <typename A, typename T>
__device__ __forceinline__ A pixel(const T* plane, index_t height, index_t width, index_t y, index_t x) {
    return (y >= 0 && y < height && x >= 0 && x < width) ? to_acc(plane[y * width + x]) : A(0);
}

// The four taps of one zero-padded bilinear sample (a point inside the open box), computed
// once and applied to many channel planes of the same size: sample() reads a plane,
// for_each() visits the taps inside the image (for scatters).
template <typename A>
struct BilinearTaps {
    A w00, w01, w10, w11;
    index_t i00;  // offset of the (floor, floor) neighbour in the plane
    index_t width;
    bool ok00, ok01, ok10, ok11;

    __device__ __forceinline__ BilinearTaps(A h, A w, index_t height, index_t width_) : width(width_) {
        Corners<A> p(h, w);
        const bool y0 = p.y0 >= 0, y1 = p.y0 + 1 < height, x0 = p.x0 >= 0, x1 = p.x0 + 1 < width;
        ok00 = y0 && x0; ok01 = y0 && x1; ok10 = y1 && x0; ok11 = y1 && x1;
        w00 = (A(1) - p.lh) * (A(1) - p.lw);
        w01 = (A(1) - p.lh) * p.lw;
        w10 = p.lh * (A(1) - p.lw);
        w11 = p.lh * p.lw;
        i00 = p.y0 * width + p.x0;
    }

    template <typename T>
    __device__ __forceinline__ A sample(const T* plane) const {
        A v = A(0);
        if (ok00) v += w00 * to_acc(plane[i00]);
        if (ok01) v += w01 * to_acc(plane[i00 + 1]);
        if (ok10) v += w10 * to_acc(plane[i00 + width]);
        if (ok11) v += w11 * to_acc(plane[i00 + width + 1]);
        return v;
    }

    // f(q, offset, weight, inside) for corner q = 0..3 (00, 01, 10, 11), inside the plane or not.
    template <typename F>
    __device__ __forceinline__ void for_corners(F f) const {
        f(0, i00, w00, ok00);
        f(1, i00 + 1, w01, ok01);
        f(2, i00 + width, w10, ok10);
        f(3, i00 + width + 1, w11, ok11);
    }

    template <typename F>
    __device__ __forceinline__ void for_each(F f) const {
        for_corners([&](int, index_t p, A wt, bool inside) {
            if (inside) f(p, wt);
        });
    }
};

template <typename A, typename T>
__device__ __forceinline__ A bilinear_zero(const T* plane, index_t height, index_t width, A h, A w) {
    if (!in_open_box(h, w, height, width)) return A(0);
    return BilinearTaps<A>(h, w, height, width).sample(plane);
}

// ---------------------------------------------------------------------------------------------
// Atomics. Default mode: floating-point atomicAdd into an accumulator of type A.
// Deterministic mode: 64-bit fixed point. Integer addition is associative, so the sum does not
// depend on the order in which threads arrive. The scale is chosen per launch from a bound on
// the largest possible sum (see fixed_point_scale) so that it never overflows. Non-finite
// contributions bypass the fixed point into the float accumulator: sums of infinities and
// NaNs do not depend on the order either.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void atomic_add(float* address, float v) { atomicAdd(address, v); }
__device__ __forceinline__ void atomic_add(double* address, double v) { atomicAdd(address, v); }

// address[0] += a, address[1] += b, address 8-byte aligned: one vector atomic where the GPU has
// them (float on sm_90), else two.
__device__ __forceinline__ void atomic_add_pair(float* address, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(address), make_float2(a, b));
#else
    atomicAdd(address, a);
    atomicAdd(address + 1, b);
#endif
}
__device__ __forceinline__ void atomic_add_pair(double* address, double a, double b) {
    atomicAdd(address, a);
    atomicAdd(address + 1, b);
}

// address[0..3] += v, address 16-byte aligned: one vector atomic on sm_90, else four.
__device__ __forceinline__ void atomic_add_quad(float* address, float4 v) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(address), v);
#else
    atomicAdd(address, v.x);
    atomicAdd(address + 1, v.y);
    atomicAdd(address + 2, v.z);
    atomicAdd(address + 3, v.w);
#endif
}

// Largest finite |v| seen, as the bits of a non-negative float (which order like unsigned ints).
template <typename A>
__device__ __forceinline__ void atomic_max_abs(unsigned int* bits, A v) {
    float a = (float)fabs(v);
    if (isfinite(a)) {
        // Round the float copy up so that it bounds the double it came from.
        if ((A)a < fabs(v)) a = nextafterf(a, __int_as_float(0x7f800000));
        atomicMax(bits, __float_as_uint(a));
    }
}

// 2**s such that `terms` values of magnitude <= max_abs sum to less than 2**62.
__device__ __forceinline__ double fixed_point_scale(unsigned int max_abs_bits, index_t terms) {
    float max_abs = __uint_as_float(max_abs_bits);
    if (max_abs == 0.0f) return 1.0;
    int e = ilogbf(max_abs) + 1;            // max_abs < 2**e
    int t = 0;
    while (((index_t)1 << t) < terms) ++t;  // terms <= 2**t
    return ldexp(1.0, 62 - e - t);
}

template <typename A>
__device__ __forceinline__ void atomic_add_fixed(unsigned long long* fixed, A* special, A v, double scale) {
    if (isfinite(v)) {
        atomicAdd(fixed, (unsigned long long)llrint((double)v * scale));
    } else {
        atomic_add(special, v);
    }
}

__device__ __forceinline__ double fixed_to_double(unsigned long long q, double scale) {
    return (double)(long long)q / scale;
}

// ---------------------------------------------------------------------------------------------
// Bilinear sampling with clamping (RoIAlign, deformable RoI pooling). A point inside the op's
// closed box (in_closed_box) is clamped into [0, H-1] x [0, W-1] and blended between its
// floor and floor + 1, the latter clamped to the last row/column; RoIAlign's clamping rules
// (y <= 0 -> 0, low corner at or past the last row -> that row) are this clamp. Where a
// coordinate is clamped the sample does not move with it, so its derivative is 0 there;
// elsewhere it is the bilinear slope, from the right at the kinks (integer coordinates).
// The CPU twin is clamped_corners in cudeform/cpu/_bilinear.py.
// ---------------------------------------------------------------------------------------------

// a * b + c, rounded after the product and after the sum, as the CPU path computes it: NVRTC
// would fuse it into one FMA, and a sample position that lands exactly on a box edge could then
// fall on the other side of it than on the CPU.
__device__ __forceinline__ float mul_add_unfused(float a, float b, float c) { return __fadd_rn(__fmul_rn(a, b), c); }
__device__ __forceinline__ double mul_add_unfused(double a, double b, double c) {
    return __dadd_rn(__dmul_rn(a, b), c);
}

// Whether v lies in [-margin, n - 1 + margin]; false for NaN. RoIAlign's box has margin 1,
// MSRA's position-sensitive pooling's margin 0.5. The box is the product of two such ranges.
template <typename A>
__device__ __forceinline__ bool in_closed_range(A v, index_t n, A margin) {
    return v >= -margin && v <= A(n - 1) + margin;
}

template <typename A>
__device__ __forceinline__ bool in_closed_box(A h, A w, index_t height, index_t width, A margin) {
    return in_closed_range(h, height, margin) && in_closed_range(w, width, margin);
}

// One coordinate of a clamped sample: its two neighbours (equal at the last row/column), the
// position between them and whether the clamped position follows the coordinate. A sample's
// blend is separable: its weight at (y, x) is the row axis's weight(y) times the column's.
template <typename A>
struct ClampedAxis {
    index_t i0, i1;
    A l;
    bool moves;

    __device__ __forceinline__ ClampedAxis(A v, index_t n) {
        moves = v >= A(0) && v < A(n - 1);
        const A c = v < A(0) ? A(0) : (v > A(n - 1) ? A(n - 1) : v);
        const A f = floor(c);
        i0 = (index_t)f;
        i1 = i0 + 1 < n ? i0 + 1 : i0;
        l = c - f;
    }

    __device__ __forceinline__ bool touches(index_t i) const { return i == i0 || i == i1; }
    __device__ __forceinline__ A weight(index_t i) const {
        return (i == i0 ? A(1) - l : A(0)) + (i == i1 ? l : A(0));
    }
};

template <typename A>
struct ClampedCorners {
    index_t y0, x0, y1, x1;  // rows and columns of the corners, inside the plane
    A lh, lw;                // position between them
    bool moves_h, moves_w;   // whether the clamped position follows h (w)

    __device__ __forceinline__ ClampedCorners(A h, A w, index_t height, index_t width) {
        const ClampedAxis<A> row(h, height), col(w, width);
        y0 = row.i0; y1 = row.i1; lh = row.l; moves_h = row.moves;
        x0 = col.i0; x1 = col.i1; lw = col.l; moves_w = col.moves;
    }

    // The corner values: v01 is (y0, x1), v10 is (y1, x0).
    template <typename T>
    __device__ __forceinline__ void fetch(const T* plane, index_t width, A& v00, A& v01, A& v10, A& v11) const {
        v00 = to_acc(plane[y0 * width + x0]);
        v01 = to_acc(plane[y0 * width + x1]);
        v10 = to_acc(plane[y1 * width + x0]);
        v11 = to_acc(plane[y1 * width + x1]);
    }

    __device__ __forceinline__ A blend(A v00, A v01, A v10, A v11) const {
        return (A(1) - lh) * ((A(1) - lw) * v00 + lw * v01) + lh * ((A(1) - lw) * v10 + lw * v11);
    }

    // d blend / dh and d blend / dw with respect to the unclamped position.
    __device__ __forceinline__ A d_h(A v00, A v01, A v10, A v11) const {
        return moves_h ? (A(1) - lw) * (v10 - v00) + lw * (v11 - v01) : A(0);
    }
    __device__ __forceinline__ A d_w(A v00, A v01, A v10, A v11) const {
        return moves_w ? (A(1) - lh) * (v01 - v00) + lh * (v11 - v10) : A(0);
    }
};

constexpr int WARP_SIZE = 32;

// The deterministic passes' bound: local becomes |v| where v is finite and larger in magnitude
// (a non-finite term bypasses the fixed point, so it needs no room there).
template <typename A>
__device__ __forceinline__ void keep_max_abs(A& local, A v) {
    if (isfinite(v) && fabs(v) > local) local = fabs(v);
}

// atomic_max_abs of the largest of a warp's values, by its lane 0: the atomics all hit one
// address, where they queue at the L2, so one per warp rather than one per thread. Every lane
// of the warp must call it (a grid-stride loop's threads all reach it).
template <typename A>
__device__ __forceinline__ void warp_atomic_max_abs(unsigned int* bits, A local) {
    for (int s = WARP_SIZE / 2; s > 0; s >>= 1) local = fmax(local, __shfl_xor_sync(0xffffffffu, local, s));
    if (threadIdx.x % WARP_SIZE == 0) atomic_max_abs(bits, local);
}

// The sum over the lanes of a converged warp, in a fixed butterfly order (reproducible);
// every lane receives it.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
    for (int s = WARP_SIZE / 2; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
    return v;
}

// The sums over a block of NV values per thread (blockDim.x a multiple of WARP_SIZE, every
// thread calling), in a fixed order: warp sums, then the warps' sums by warp 0. Reproducible;
// the results are in thread 0. scratch: NV * WARP_SIZE elements of shared memory, reusable by
// the next call.
template <int NV, typename A>
__device__ __forceinline__ void block_sums(A (&v)[NV], A* scratch) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
#pragma unroll
    for (int e = 0; e < NV; ++e) v[e] = warp_sum(v[e]);
    __syncthreads();  // the previous call's readers are done with scratch
    if (lane == 0) {
#pragma unroll
        for (int e = 0; e < NV; ++e) scratch[e * WARP_SIZE + warp] = v[e];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int e = 0; e < NV; ++e)
            v[e] = warp_sum(lane < (int)(blockDim.x / WARP_SIZE) ? scratch[e * WARP_SIZE + lane] : A(0));
    }
}

// d/dh and d/dw of bilinear_zero at one point, from the right at the kinks (integer
// coordinates): non-zero on [-1, H) x [-1, W), so a point at exactly h = -1, which reads 0, is
// still pulled into the plane (deform_conv2d's border_grad="torchvision"). As BilinearTaps, the
// corners are found once and applied to many planes of the same size.
template <typename A>
struct BilinearSlopes {
    A lh, lw;
    index_t i00, width;
    bool live, ok00, ok01, ok10, ok11;

    __device__ __forceinline__ BilinearSlopes(A h, A w, index_t height, index_t width_) : width(width_) {
        live = h >= A(-1) && h < A(height) && w >= A(-1) && w < A(width_);
        if (!live) h = w = A(0);  // keeps NaN and infinities out of floor() and the casts
        const Corners<A> p(h, w);
        const bool y0 = p.y0 >= 0, y1 = p.y0 + 1 < height, x0 = p.x0 >= 0, x1 = p.x0 + 1 < width;
        ok00 = live && y0 && x0; ok01 = live && y0 && x1; ok10 = live && y1 && x0; ok11 = live && y1 && x1;
        lh = p.lh;
        lw = p.lw;
        i00 = p.y0 * width + p.x0;
    }

    template <typename T>
    __device__ __forceinline__ void grad(const T* plane, A& grad_h, A& grad_w) const {
        const A v00 = ok00 ? to_acc(plane[i00]) : A(0);
        const A v01 = ok01 ? to_acc(plane[i00 + 1]) : A(0);
        const A v10 = ok10 ? to_acc(plane[i00 + width]) : A(0);
        const A v11 = ok11 ? to_acc(plane[i00 + width + 1]) : A(0);
        grad_h = (A(1) - lw) * (v10 - v00) + lw * (v11 - v01);
        grad_w = (A(1) - lh) * (v01 - v00) + lh * (v11 - v10);
    }
};

}  // namespace cudeform

// ---------------------------------------------------------------------------------------------
// Small kernels every op module may instantiate (through its name expressions).
// ---------------------------------------------------------------------------------------------

// dst = src converted to the storage type (accumulators of the half types -> __half/bfloat16).
template <typename T>
__global__ void cast_from_acc(const typename cudeform::acc<T>::type* __restrict__ src, cudeform::index_t n,
                              T* __restrict__ dst) {
    CUDEFORM_LOOP(i, n) { dst[i] = cudeform::from_acc<T>(src[i]); }
}

// acc += fixed / scale: the deterministic sums back into floating point, element by element.
template <typename A>
__global__ void fixed_point_add(const unsigned long long* __restrict__ fixed,
                                const unsigned int* __restrict__ max_abs_bits, cudeform::index_t terms,
                                cudeform::index_t n, A* __restrict__ acc) {
    const double scale = cudeform::fixed_point_scale(*max_abs_bits, terms);
    CUDEFORM_LOOP(i, n) { acc[i] += (A)cudeform::fixed_to_double(fixed[i], scale); }
}

// out[n, c, l] += bias[c] for an (images, channels, L) block, in place. A block per (image,
// channel) plane at a time: the bias is read once per plane and no thread divides (one thread
// per element with two divisions each ran at a third of the memory's speed). Launch
// images * channels blocks (the grid-stride loop takes the rest).
template <typename T>
__global__ void add_bias(T* out, const T* __restrict__ bias, cudeform::index_t images, cudeform::index_t channels,
                         cudeform::index_t L) {
    for (cudeform::index_t plane = blockIdx.x; plane < images * channels; plane += gridDim.x) {
        const auto b = cudeform::to_acc(bias[plane - cudeform::fast_div(plane, channels) * channels]);
        T* row = out + plane * L;
        for (cudeform::index_t l = threadIdx.x; l < L; l += blockDim.x) {
            row[l] = cudeform::from_acc<T>(cudeform::to_acc(row[l]) + b);
        }
    }
}

// Bias gradient, pass 1: partial[p] = the sum of plane p of grad_output ((images * channels)
// planes of L elements), `lanes` threads per plane (a warp; the block, blockDim.x, for long
// planes), each summing 16-byte vectors strided by `lanes` (elements where the plane is not
// aligned to them), then warp_sum or block_sums; pass 2, sum_partials with images chunks, gives
// each channel's sum. Both orders are fixed, so the result is reproducible. (One block per
// channel over all the images used a fraction of the GPU: at N=16, C=256, 56x56 on an H200 it
// took 61 us in fp16 and 83 us in fp32, a block per plane with element loads 19 and 26 us for
// both passes. At N=16, C=256, 32x32 in fp16 that took 11 us; a warp per plane with vector
// loads, 5.)
template <typename T>
__global__ void __launch_bounds__(256) plane_sums(const T* __restrict__ src, cudeform::index_t planes,
                                                  cudeform::index_t L, int lanes,
                                                  typename cudeform::acc<T>::type* __restrict__ partial) {
    typedef typename cudeform::acc<T>::type A;
    using cudeform::index_t;
    constexpr int V = 16 / (int)sizeof(T);
    __shared__ A scratch[cudeform::WARP_SIZE];
    const int per_block = (int)blockDim.x / lanes, lane = (int)threadIdx.x % lanes;
    for (index_t first = (index_t)blockIdx.x * per_block; first < planes; first += (index_t)gridDim.x * per_block) {
        const index_t p = first + (int)threadIdx.x / lanes;
        A sum[1] = {A(0)};
        if (p < planes) {
            const T* const plane = src + p * L;
            if (L % V == 0 && reinterpret_cast<size_t>(plane) % 16 == 0) {
                for (index_t v = lane; v < L / V; v += lanes) {
                    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(plane) + v);
                    const T* const e = reinterpret_cast<const T*>(&raw);
#pragma unroll
                    for (int u = 0; u < V; ++u) sum[0] += cudeform::to_acc(e[u]);
                }
            } else {
                for (index_t t = lane; t < L; t += lanes) sum[0] += cudeform::to_acc(plane[t]);
            }
        }
        if (lanes == cudeform::WARP_SIZE) {
            sum[0] = cudeform::warp_sum(sum[0]);
        } else {
            cudeform::block_sums(sum, scratch);
        }
        if (lane == 0 && p < planes) partial[p] = sum[0];
    }
}

// Pass 2 of a two-pass reduction: out[e] = the sum over the chunks of partial[chunk, e], in
// chunk order, converted to the storage type.
template <typename T>
__global__ void sum_partials(const typename cudeform::acc<T>::type* __restrict__ partial, cudeform::index_t chunks,
                             cudeform::index_t n, T* __restrict__ out) {
    typedef typename cudeform::acc<T>::type A;
    CUDEFORM_LOOP(idx, n) {
        A total = A(0);
        for (cudeform::index_t chunk = 0; chunk < chunks; ++chunk) total += partial[chunk * n + idx];
        out[idx] = cudeform::from_acc<T>(total);
    }
}
