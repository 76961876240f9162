// Shared device code of every cudeform kernel: index type, grid-stride loops, conversions
// between storage and accumulation types, bilinear sampling and atomics.
// The CPU twin of the sampling rules is cudeform/cpu/_bilinear.py.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cudeform {

// Sizes and offsets are 64-bit: N*C*H*W and C*kh*kw*N*H_out*W_out pass 2**31 on real inputs.
typedef long long index_t;

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

template <typename A, typename T>
__device__ __forceinline__ A bilinear_zero(const T* plane, index_t height, index_t width, A h, A w) {
    if (!in_open_box(h, w, height, width)) return A(0);
    Corners<A> p(h, w);
    return (A(1) - p.lh) * ((A(1) - p.lw) * pixel<A>(plane, height, width, p.y0, p.x0)
                            + p.lw * pixel<A>(plane, height, width, p.y0, p.x0 + 1))
         + p.lh * ((A(1) - p.lw) * pixel<A>(plane, height, width, p.y0 + 1, p.x0)
                   + p.lw * pixel<A>(plane, height, width, p.y0 + 1, p.x0 + 1));
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

// Bias gradient: out[c] = sum over (n, l) of grad_output[n, c, l]. One block per channel and a
// fixed summation order (strided per thread, then a tree), so the result is reproducible.
// Launch with 256 threads per block.
template <typename T>
__global__ void bias_grad(const T* __restrict__ grad_output, cudeform::index_t n, cudeform::index_t channels,
                          cudeform::index_t L, T* __restrict__ out) {
    typedef typename cudeform::acc<T>::type A;
    __shared__ A partial[256];
    for (cudeform::index_t c = blockIdx.x; c < channels; c += gridDim.x) {
        A sum = A(0);
        for (cudeform::index_t t = threadIdx.x; t < n * L; t += blockDim.x)
            sum += cudeform::to_acc(grad_output[((t / L) * channels + c) * L + t % L]);
        partial[threadIdx.x] = sum;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
            __syncthreads();
        }
        if (threadIdx.x == 0) out[c] = cudeform::from_acc<T>(partial[0]);
        __syncthreads();
    }
}
