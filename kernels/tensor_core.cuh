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

// The same, each matrix transposed: lane i gives the address of row i % 8 of stored matrix
// i / 8, whose column j the lanes receive as row j (an A fragment from a tile stored k-major).
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* p) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
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

// Hopper's warpgroup MMA (wgmma, sm_90a only: __CUDA_ARCH_FEAT_SM90_ALL; elsewhere these
// compile to nothing and the hosts never launch their kernels). Operands in shared memory,
// described by wgmma_desc; float32 accumulators in registers, 64 per thread for a 64 x 128
// tile of a warpgroup (4 consecutive warps, the first a multiple of 4).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CUDEFORM_WGMMA 1
#endif

// The descriptor of a tile in the 128-byte swizzle: rows of 128 bytes (64 16-bit elements)
// whose 16-byte chunk q of row r lies at chunk q ^ (r % 8), in atoms of 8 rows (1024 bytes,
// the tile aligned to 1024). K-major (the rows are M or N, the elements K): the next 8 rows
// are `atom_stride` bytes on. MN-major (rows of K, elements M or N): the next 8 K rows are, and
// the next 64 columns of M or N `column_stride` bytes on (unused within 64).
__device__ __forceinline__ unsigned long long wgmma_desc(const void* tile, unsigned atom_stride,
                                                         unsigned column_stride) {
    return (unsigned long long)((shared_address(tile) & 0x3FFFF) >> 4)
           | ((unsigned long long)(column_stride >> 4) << 16) | ((unsigned long long)(atom_stride >> 4) << 32)
           | (1ull << 62);
}

// Where element (r, c) of such a tile lies, in elements from its start.
__device__ __forceinline__ int swizzled(int r, int c) { return r * 64 + ((((c >> 3) ^ r) & 7) << 3) + (c & 7); }

__device__ __forceinline__ void wgmma_fence() {
#if CUDEFORM_WGMMA
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if CUDEFORM_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int pending>
__device__ __forceinline__ void wgmma_wait() {
#if CUDEFORM_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(pending) : "memory");
#endif
}
// Shared memory written by the threads' (generic) stores and cp.async, made visible to wgmma's
// reads (the async proxy): each writer fences before the barrier that publishes its writes.
__device__ __forceinline__ void fence_proxy_async() {
#if CUDEFORM_WGMMA
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accesses of v across the asynchronous MMAs.
__device__ __forceinline__ void wgmma_operand(float& v) { asm volatile("" : "+f"(v)::"memory"); }

// d (64 x N, float32, N / 2 registers a thread) += a (64 x 16) * b (16 x N), N = 128 or 64:
// each operand K-major (b's rows the N columns of d), or MN-major where TRANS_A / TRANS_B. One
// specialisation per type and N, made by CUDEFORM_WGMMA_RUN: they differ in the PTX type and
// in the accumulators' operand list (then a, b, the scale-d predicate and the transposes).
#define CUDEFORM_WGMMA_D32                                                                                    \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "    \
    "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define CUDEFORM_WGMMA_D64                                                                                    \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "    \
    "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, " \
    "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define CUDEFORM_WGMMA_OUTS32(d)                                                                               \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),           \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),     \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),   \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define CUDEFORM_WGMMA_OUTS64(d)                                                                               \
    CUDEFORM_WGMMA_OUTS32(d),                                                                                  \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),   \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),   \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),   \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// The operands after the accumulators: a, b, the predicate's source, the two transposes.
#define CUDEFORM_WGMMA_TAIL32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
#define CUDEFORM_WGMMA_TAIL64 ", %64, %65, p, 1, 1, %67, %68;\n}\n"
#define CUDEFORM_WGMMA_P32 "%34"
#define CUDEFORM_WGMMA_P64 "%66"
#if CUDEFORM_WGMMA
#define CUDEFORM_WGMMA_ASM(PTX_TYPE, N, REGS)                                                                  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " CUDEFORM_WGMMA_P##REGS ", 0;\n"                          \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " "                 \
                 CUDEFORM_WGMMA_D##REGS CUDEFORM_WGMMA_TAIL##REGS                                             \
                 : CUDEFORM_WGMMA_OUTS##REGS(d) : "l"(a), "l"(b), "r"(1), "n"(TRANS_A), "n"(TRANS_B))
#else
#define CUDEFORM_WGMMA_ASM(PTX_TYPE, N, REGS)
#endif
#define CUDEFORM_WGMMA_RUN(T, PTX_TYPE, N, REGS)                                                               \
    template <int TRANS_A, int TRANS_B> struct Wgmma<T, N, TRANS_A, TRANS_B> {                                \
        static __device__ __forceinline__ void run(float* d, unsigned long long a, unsigned long long b) {    \
            CUDEFORM_WGMMA_ASM(PTX_TYPE, N, REGS);                                                             \
        }                                                                                                      \
    };
template <typename T, int N, int TRANS_A, int TRANS_B> struct Wgmma;
CUDEFORM_WGMMA_RUN(__half, "f16", 128, 64)
CUDEFORM_WGMMA_RUN(__nv_bfloat16, "bf16", 128, 64)
CUDEFORM_WGMMA_RUN(__half, "f16", 64, 32)
CUDEFORM_WGMMA_RUN(__nv_bfloat16, "bf16", 64, 32)

// The wgmma kernels' epilogue, its first half: each warpgroup's 64 x N float32 accumulators
// (thread: rows r and r + 8 of its warp's 16, two columns of each 8; warpgroup w's rows from
// 64 w) plus bias[r] (where use_bias, on rows below rows_valid) into a shared tile of T, rows
// `pitch` elements apart, rounded once. The block then stores the tile with store_tile.
template <typename T, int N>
__device__ __forceinline__ void stage_accumulators(const float* accum, const T* bias, int use_bias, int rows_valid,
                                                   T* tile, int pitch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r_lane = (warp >> 2) * 64 + (warp & 3) * 16 + (lane >> 2), c_lane = (lane & 3) * 2;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = r_lane + half * 8;
        const float add = use_bias && r < rows_valid ? to_acc(bias[r]) : 0.0f;
#pragma unroll
        for (int j = 0; j < N / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                tile[r * pitch + j * 8 + c_lane + e] = from_acc<T>(accum[4 * j + half * 2 + e] + add);
    }
}

// The tensor-core kernels' epilogue: a staged tile of rows x cols outputs (rows `pitch` elements
// apart in shared memory) stored at out[row0 + r, l0 + col] of planes of L positions, a row at a
// time by the block's `threads` threads, in 16-byte vectors where the planes' rows are whole
// vectors; rows past `rows_valid` and positions past L are left alone.
template <typename T>
__device__ __forceinline__ void store_tile(const T* tile, int pitch, int rows, int cols, int rows_valid,
                                           T* __restrict__ out, index_t row0, index_t l0, index_t L, int threads) {
    const bool vectors = L % 8 == 0;
    for (int v = threadIdx.x; v < rows * cols / 8; v += threads) {
        const int r = v / (cols / 8), col = v % (cols / 8) * 8;
        if (r >= rows_valid || l0 + col >= L) continue;
        T* const dst = out + (row0 + r) * L + l0 + col;
        const T* const src = tile + r * pitch + col;
        if (vectors) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
            for (int e = 0; e < 8 && l0 + col + e < L; ++e) dst[e] = src[e];
        }
    }
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
