// Building blocks of the implicit-GEMM kernels on tensor cores (sm_80 and newer, the half
// types): cp.async copies into shared memory, ldmatrix, mma.sync m16n8k16 with float32
// accumulators (and m16n8k8 on TF32), and the channels-last copy their operands are read from.
// Every helper compiles to nothing below sm_80; the hosts take these paths only on sm_80+.
#pragma once

#include "common.cuh"

namespace cudeform {

// d += a * b for one 16x8x16 tile: a (row-major 16x16) in 4 registers, b (column-major 16x8) in
// 2, d (16x8 float) in 4, in the register layout of PTX's mma.m16n8k16.
template <typename T> struct Mma;
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float* d, const unsigned* a, const unsigned* b) {
#if __CUDA_ARCH__ >= 800
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
};
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float* d, const unsigned* a, const unsigned* b) {
#if __CUDA_ARCH__ >= 800
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
};

// The TF32 value nearest v (round to nearest, ties away), as mma_tf32's operands want it: 10
// mantissa bits, so float16 and bfloat16 values pass unchanged.
__device__ __forceinline__ unsigned to_tf32(float v) {
    unsigned r = 0;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
#endif
    return r;
}

// d += a * b for one 16x8x8 tile of TF32 operands (to_tf32): a (row-major 16x8) in 4
// registers, b (column-major 8x8) in 2, d (16x8 float) in 4, in the layout of PTX's
// mma.m16n8k8.
__device__ __forceinline__ void mma_tf32(float* d, const unsigned* a, const unsigned* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit elements from shared memory: lane i gives the address of row
// i % 8 of matrix i / 8.
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* p) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(p)));
#endif
}

// 16 bytes global -> shared without passing through registers; 16 zero bytes when !valid
// (src is then not read, but must still be a global address).
__device__ __forceinline__ void copy_async_16(void* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(shared_address(dst)), "l"(src), "r"(valid ? 16 : 0) : "memory");
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most `pending` of this thread's committed copy groups are still in flight.
template <int pending>
__device__ __forceinline__ void copy_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" :: "n"(pending) : "memory");
#endif
}

}  // namespace cudeform

// (N, C, P) -> (N, P, C) for C a multiple of 8: planes of P positions made channels-last,
// through 64 x 64 tiles in `shared` (CHANNELS_LAST_SHARED bytes). Blocks of 256 threads take
// tiles first, first + step, ...: each warp reads rows (channels) of a tile, coalesced; each
// thread then writes 8 channels of a position as one 16-byte vector. (32 x 32 tiles of scalar
// copies, 4 elements per thread, spent most of their instructions on the tile's bookkeeping:
// 22 us for 8 MiB on an H200.) A device function: a kernel runs it beside other independent
// work in one launch.
constexpr int CHANNELS_LAST_EDGE = 64;
// Rows of 65 elements: the 8 rows apart that a warp's vector gathers read fall in distinct banks.
constexpr int CHANNELS_LAST_SHARED = CHANNELS_LAST_EDGE * (CHANNELS_LAST_EDGE + 1) * 2;

template <typename T>
__device__ __forceinline__ void channels_last(const T* __restrict__ in, cudeform::index_t images,
                                              cudeform::index_t channels, cudeform::index_t positions,
                                              T* __restrict__ out, unsigned char* shared, cudeform::index_t first,
                                              cudeform::index_t step) {
    using cudeform::index_t;
    static_assert(sizeof(T) == 2, "16-bit types: a 16-byte vector is 8 channels");
    constexpr int EDGE = CHANNELS_LAST_EDGE;
    T (*tile)[EDGE + 1] = reinterpret_cast<T (*)[EDGE + 1]>(shared);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const index_t ct = (channels + EDGE - 1) / EDGE, pt = (positions + EDGE - 1) / EDGE;
    for (index_t t = first; t < images * ct * pt; t += step) {
        const index_t n = cudeform::fast_div(t, ct * pt), rest = t - n * ct * pt;
        const index_t cq = cudeform::fast_div(rest, pt), c0 = cq * EDGE, p0 = (rest - cq * pt) * EDGE;
        const int rows = (int)min((index_t)EDGE, channels - c0), cols = (int)min((index_t)EDGE, positions - p0);
        const T* src = in + (n * channels + c0) * positions + p0;
        T* dst = out + (n * positions + p0) * channels + c0;
        __syncthreads();  // the previous tile's reads are done
#pragma unroll 4
        for (int r = warp; r < rows; r += 8) {
            if (lane < cols) tile[r][lane] = src[r * positions + lane];
            if (lane + 32 < cols) tile[r][lane + 32] = src[r * positions + lane + 32];
        }
        __syncthreads();
        // Thread: 8 channels from (threadIdx.x % 8) * 8 of positions threadIdx.x / 8 + 32 * v.
        const int c = (threadIdx.x & 7) * 8;
        if (c < rows) {
#pragma unroll
            for (int v = 0; v < 2; ++v) {
                const int q = (threadIdx.x >> 3) + 32 * v;
                if (q >= cols) break;
                __align__(16) T packed[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) packed[e] = tile[c + e][q];
                *reinterpret_cast<uint4*>(dst + (index_t)q * channels + c) = *reinterpret_cast<const uint4*>(packed);
            }
        }
    }
}
