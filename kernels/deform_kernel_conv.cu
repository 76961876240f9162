// Deformable Kernels (global and local DK): the input is read on the rigid grid, the kernel is
// resampled from its scope. Host code: cudeform/cuda/deform_kernel_conv.py. CPU twin:
// cudeform/cpu/deform_kernel_conv.py.
//
// weight (C_out, Cg, S_h, S_w) is the scope, Cg = C_in / groups. Kernel point (i, j) of offset
// group g reads it with bilinear_zero at (i + (S_h - kh)/2 + dh, j + (S_w - kw)/2 + dw). Output
// channel o belongs to weight group o / (C_out / groups) and to offset group o / (C_out / G).
//
// Global DK: one sampled kernel per image, (N, C_out, Cg, K), K = kh * kw. When Cg * K is small
// (depthwise) the convolution is direct: dk_global_conv samples the kernel of a plane into
// shared memory and convolves tiles of input staged there, and the backward has direct kernels
// too; otherwise the half types' forward is dk_global_mma, an implicit GEMM on tensor cores, and
// elsewhere dk_resample stores the kernels and the host multiplies them with dk_im2col's
// columns (cuBLAS). The backward goes through the resampled kernels' gradient,
// (N, bands, C_out, Cg, K), or (N, C_out, K, Cg) for the shapes of dk_global_mma, whose
// backward's columns are kernel-point-major (ColumnRows).
// Local DK: fused kernels that sample the scope at every output position, each thread for a
// chunk of channels that share the position's scope taps; nothing per position is stored.
//
// Every sum is a gather or a block reduction with a fixed order: the backward is bitwise
// reproducible and uses no atomics. Templated on the storage type T; sums in acc<T>::type.
#include "common.cuh"
#include "tensor_core.cuh"

using namespace cudeform;

// The geometry every kernel of this file takes, in this order (see _geometry_args in the host).
#define DK_GEOMETRY                                                                                \
    index_t batch, index_t channels, index_t height, index_t width, index_t c_out, index_t groups, \
    index_t offset_groups, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw,        \
    index_t out_h, index_t out_w, index_t scope_h, index_t scope_w

#define DK_GEO                                                                                     \
    const DkGeometry geo{batch, channels, height, width, c_out, groups, offset_groups, kh, kw, sh, \
                         sw, ph, pw, dh, dw, out_h, out_w, scope_h, scope_w}

// Outputs of a column, one above the other, that a thread of dk_global_conv computes (SPAN in
// the host).
#define DK_SPAN 8
// Kernel points of one kernel row that dk_global_input_grad unrolls.
#define DK_ROW_TAPS 4
// Kernel points whose gradient a thread of dk_global_kernel_grad sums at once, one
// warp_transpose_sums (DK_POINT_RUN in the host: its block sums' shared memory).
#define DK_POINT_RUN 16
// Kernel points whose loads dk_col2im's per-pixel sums issue at once, and the outputs of a row
// (dk_im2col) or pixels (dk_col2im) a thread takes (IM2COL_RUN in the host).
#define DK_IM2COL_PIECE 9
#define DK_IM2COL_RUN 4
// Channels that a thread of the local kernels handles at once (CHUNK in the host).
#define DK_CHUNK 8
// Loads in flight per thread while a block copies into shared memory (walk_copy).
#define DK_STAGE_LOADS 4
// Scope elements that a thread of dk_global_resample_grad holds at once (SCOPE_RUN in the host),
// and kernel points whose corners it takes at once (each half of them has 16 slopes, one
// warp_transpose_sums).
#define DK_SCOPE_RUN 16
#define DK_POINT_GROUP 16

// a / b for the direct kernels' non-negative 32-bit coordinates. Unlike fast_div it has no
// 64-bit fallback, whose subroutine call makes the compiler spill registers around it.
__device__ __forceinline__ int div32(int a, int b) { return (int)((unsigned)a / (unsigned)b); }

// a / b for non-negative a, b of either coordinate type.
__device__ __forceinline__ int quotient(int a, int b) { return div32(a, b); }
__device__ __forceinline__ index_t quotient(index_t a, index_t b) { return fast_div(a, b); }

// a / b rounded up, for positive a, b: 64-bit sizes or 32-bit coordinates.
__device__ __forceinline__ index_t ceil_div(index_t a, index_t b) { return b == 1 ? a : fast_div(a + b - 1, b); }
__device__ __forceinline__ int ceil_div(int a, int b) { return b == 1 ? a : div32(a + b - 1, b); }

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

    // Where kernel point (i, j), moved by its offsets (dh at off[0], dw at off[step]), reads the
    // scope: the kh x kw grid is centred in the S_h x S_w scope.
    template <typename A, typename T>
    __device__ __forceinline__ void scope_point(int i, int j, const T* off, index_t step, A& h, A& w) const {
        h = A(2 * i + (int)(scope_h - kh)) / A(2) + to_acc(off[0]);
        w = A(2 * j + (int)(scope_w - kw)) / A(2) + to_acc(off[step]);
    }

    // Global DK: kernel point k of the scope `plane`, moved by `off`, the offsets of one
    // (image, offset group).
    template <typename A, typename T>
    __device__ __forceinline__ A resample(const T* plane, const T* off, int k) const {
        A h, w;
        scope_point(k / kw, k % kw, off + 2 * k, 1, h, w);
        return bilinear_zero<A>(plane, scope_h, scope_w, h, w);
    }

    __device__ __forceinline__ index_t in_row(index_t y, int i) const { return y * sh - ph + (index_t)i * dh; }
    __device__ __forceinline__ index_t in_col(index_t x, int j) const { return x * sw - pw + (index_t)j * dw; }

    // Local DK: f(pixel, h, w) for each kernel point of output (y, x) whose rigid input pixel
    // (pixel = iy * width + ix) is inside the image and whose moved point (h, w) is inside the
    // scope's open box. `off` points at the offsets of (image, offset group) at (y, x): those of
    // kernel point k at off[2 * k * L] and off[(2 * k + 1) * L].
    template <typename A, typename T, typename F>
    __device__ __forceinline__ void for_each_local_tap(index_t y, index_t x, const T* off, index_t L, F f) const {
        for (int i = 0; i < kh; ++i) {
            const index_t iy = in_row(y, i);
            if (iy < 0 || iy >= height) continue;
            for (int j = 0; j < kw; ++j) {
                const index_t ix = in_col(x, j), k = (index_t)i * kw + j;
                if (ix < 0 || ix >= width) continue;
                A h, w;
                scope_point(i, j, off + 2 * k * L, L, h, w);
                if (in_open_box(h, w, scope_h, scope_w)) f(iy * width + ix, h, w);
            }
        }
    }

    // The output row whose kernel row i reads input row iy; false when there is none (stride).
    // I: the in-plane coordinates' type (int where every one fits, index_t otherwise).
    template <typename I>
    __device__ __forceinline__ bool out_row(I iy, int i, I& y) const {
        const I t = iy + ph - (I)i * dh;
        if (t < 0) return false;
        y = sh == 1 ? t : quotient(t, (I)sh);
        return y * sh == t && y < (I)out_h;
    }
    template <typename I>
    __device__ __forceinline__ bool out_col(I ix, int j, I& x) const {
        const I t = ix + pw - (I)j * dw;
        if (t < 0) return false;
        x = sw == 1 ? t : quotient(t, (I)sw);
        return x * sw == t && x < (I)out_w;
    }
};

// ---------------------------------------------------------------------------------------------
// Inside one (image, channel) plane the direct kernels count in 32 bits: the host takes the
// direct path only when every coordinate of the convolution fits (planes of fewer than 2**30
// positions, see _direct in the host). 64-bit index arithmetic would double their instructions.
// ---------------------------------------------------------------------------------------------

// The kernel points [lo, hi) of one axis whose rigid coordinates first + point * step fall
// inside [0, size); the others read the zero padding.
__device__ __forceinline__ void points_inside(int first, int step, int points, int size, int& lo, int& hi) {
    lo = first >= 0 ? 0 : min(points, ceil_div(-first, step));
    hi = first >= size ? 0 : min(points, ceil_div(size - first, step));
}

// The kernel points [lo, hi) of one axis with which an output in [0, out) could read input
// coordinate `in`: t = in + pad - point * dil in [0, (out - 1) * stride]. With a stride, t must
// also be a multiple of it (that output is t / stride).
__device__ __forceinline__ void points_reaching(int in, int pad, int dil, int stride, int points, int out, int& lo,
                                                int& hi) {
    const int top = in + pad, excess = top - (out - 1) * stride;
    hi = top < 0 ? 0 : min(points, (dil == 1 ? top : div32(top, dil)) + 1);
    lo = excess <= 0 ? 0 : min(points, ceil_div(excess, dil));
}

// The positions [begin, end) of a plane `width` wide that a thread takes, begin + threadIdx.x,
// then every blockDim.x, with their row and column: split once, then advanced by additions (a
// division per position would cost as much as a light kernel's work on it). band(): band b of
// `bands` that cut a plane of `size` positions.
struct PlaneWalk {
    int p, y, x, end, width, step_y, step_x;

    PlaneWalk() = default;
    __device__ __forceinline__ PlaneWalk(int begin, int end_, int width_) : end(end_), width(width_) {
        p = begin + (int)threadIdx.x;
        y = div32(p, width);
        x = p - y * width;
        step_y = div32((int)blockDim.x, width);
        step_x = (int)blockDim.x - step_y * width;
    }

    __device__ static __forceinline__ PlaneWalk band(index_t b, index_t bands, index_t size, index_t width) {
        const int length = (int)ceil_div(size, bands);
        return PlaneWalk((int)b * length, min((int)size, ((int)b + 1) * length), (int)width);
    }

    __device__ __forceinline__ bool live() const { return p < end; }

    __device__ __forceinline__ void next() {
        p += blockDim.x;
        y += step_y;
        x += step_x;
        if (x >= width) {
            x -= width;
            ++y;
        }
    }
};

// store(q, load(q)) for each position q of a walk, DK_STAGE_LOADS loads before their stores,
// so that as many are in flight per thread: a load and its store one after the other kept one
// in flight, and the copies into shared memory of the kernels here were latency-bound. `load`
// returns the element as stored (V) and `store` converts it: a conversion between the loads
// waits for its load, and serialised fp16 copies (Nsight Compute: 4x the long-scoreboard stalls
// of fp32).
template <typename V, typename Load, typename Store>
__device__ __forceinline__ void walk_copy(PlaneWalk q, Load load, Store store) {
    while (q.live()) {
        PlaneWalk at[DK_STAGE_LOADS];
        V v[DK_STAGE_LOADS];
#pragma unroll
        for (int u = 0; u < DK_STAGE_LOADS; ++u) {
            at[u] = q;
            if (q.live()) v[u] = load(q);
            q.next();
        }
#pragma unroll
        for (int u = 0; u < DK_STAGE_LOADS; ++u) {
            if (at[u].live()) store(at[u], v[u]);
        }
    }
}

// One step of warp_transpose_sums: lanes WIDTH apart swap the halves of v[0, 2 * WIDTH) they
// give away, and each keeps its other half, summed, in v[0, WIDTH).
template <int WIDTH, int V, typename A>
__device__ __forceinline__ void transpose_sum_step(A (&v)[V]) {
    const bool upper = threadIdx.x & WIDTH;
#pragma unroll
    for (int i = 0; i < WIDTH; ++i) {
        const A give = upper ? v[i] : v[i + WIDTH], keep = upper ? v[i + WIDTH] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, give, WIDTH);
    }
}

// The sums over the lanes of a converged warp of V = 16 values per lane: lane l receives the sum
// of v[l % 16]. 16 shuffles where 16 warp_sums take 80. Fixed order, reproducible.
template <typename A>
__device__ __forceinline__ A warp_transpose_sums(A (&v)[16]) {
    static_assert(WARP_SIZE == 32, "four halving steps, then one butterfly");
    transpose_sum_step<8>(v);
    transpose_sum_step<4>(v);
    transpose_sum_step<2>(v);
    transpose_sum_step<1>(v);
    return v[0] + __shfl_xor_sync(0xffffffffu, v[0], 16);
}

// ---------------------------------------------------------------------------------------------
// Global DK
// ---------------------------------------------------------------------------------------------

// The taps of kernel point k of one (image, offset group), whose offsets `off` points at, in the
// scope: bilinear_zero in two steps, the taps once, then a sample per scope. Corner q's weight
// and scope index, -1 where it reads the zero padding (every corner, outside the open box).
template <typename A>
struct ScopeTap {
    A weight[4];
    int at[4];

    ScopeTap() = default;  // for shared arrays
    template <typename T>
    __device__ __forceinline__ ScopeTap(const DkGeometry& geo, const T* off, int k) {
        A h, w;
        geo.scope_point(k / geo.kw, k % geo.kw, off, 1, h, w);
        const bool inside = in_open_box(h, w, geo.scope_h, geo.scope_w);
        BilinearTaps<A>(inside ? h : A(0), inside ? w : A(0), geo.scope_h, geo.scope_w)
            .for_corners([&](int q, index_t s, A wt, bool ok) {
                weight[q] = wt;
                at[q] = inside && ok ? (int)s : -1;
            });
    }
};
static_assert(sizeof(ScopeTap<float>) == 32, "TAP_BYTES in the host");

// kernels[n, o, c, k]: the scope of (o, c) sampled at kernel point k moved by image n's offsets.
// A block per (offset group, tile of blockDim.x of the group's (o, c) pairs, which are
// contiguous, chunk of `images` images), so kernel point k's taps are the same for the whole
// block at each image. When `staged`, the block first copies the tile's scopes, one after the
// other in `weight`, into shared memory, coalesced, a scope every `pitch` elements (odd: a
// warp's reads at the same element of different scopes spread over the banks), once for all
// its images; else they are read in place. Then a thread per slot (r0, k) takes kernel point k
// of pairs r0, r0 + per, ...: consecutive threads write consecutive outputs, and each computes
// its point's taps once per image. (At N=16, C=256, 4x4 scope in fp16 on an H200: 29 us, 66
// instructions per output; a block per image, copying the scopes for each, 124 instructions per
// output and 47 us; a thread per pair sampling its own scope in global memory, 54 us.)
template <typename T>
__global__ void dk_resample(const T* __restrict__ weight, const T* __restrict__ offset, int staged, int pitch,
                            index_t images, DK_GEOMETRY, T* __restrict__ kernels) {
    typedef typename acc<T>::type A;
    DK_GEO;
    extern __shared__ __align__(16) unsigned char dk_shared[];
    A* scopes = reinterpret_cast<A*>(dk_shared);
    const int K = (int)geo.K();
    const index_t S = geo.scope(), terms = geo.opg() * geo.cg(), tiles = ceil_div(terms, (index_t)blockDim.x);
    const index_t chunks = ceil_div(batch, images);
    const int per = max(1, (int)blockDim.x / K);  // pairs a step of the output loop covers
    for (index_t unit = blockIdx.x; unit < offset_groups * tiles * chunks; unit += gridDim.x) {
        const index_t gt = fast_div(unit, chunks), g = fast_div(gt, tiles), n0 = (unit - gt * chunks) * images;
        const index_t first = g * terms + (gt - g * tiles) * blockDim.x;
        const int count = (int)min((index_t)blockDim.x, (g + 1) * terms - first);
        if (staged) {
            __syncthreads();  // the previous unit's threads are done with the shared memory
            walk_copy<T>(
                PlaneWalk(0, count * (int)S, (int)S), [&](const PlaneWalk& q) { return weight[first * S + q.p]; },
                [&](const PlaneWalk& q, T v) { scopes[q.y * pitch + q.x] = to_acc(v); });
            __syncthreads();
        }
        for (index_t n = n0; n < min(batch, n0 + images); ++n) {
            T* dst = kernels + (n * c_out * geo.cg() + first) * K;
            for (int slot = threadIdx.x; slot < per * K; slot += blockDim.x) {
                const int r0 = div32(slot, K), k = slot - r0 * K;
                const ScopeTap<A> t(geo, offset + 2 * ((n * offset_groups + g) * K + k), k);
                for (int r = r0; r < count; r += per) {
                    A v = A(0);
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        // Every load issued (a padding corner reads entry 0 and drops it): a
                        // branch around each made this kernel 4 us slower in fp32.
                        const int at = max(t.at[q], 0);
                        const A x = staged ? scopes[r * pitch + at] : to_acc(weight[(first + r) * S + at]);
                        if (t.at[q] >= 0) v += t.weight[q] * x;
                    }
                    dst[r * K + k] = from_acc<T>(v);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Global DK on tensor cores (the half types on sm_80+, Cg a multiple of 8): per (image, weight
// group) the GEMM out[o, l] = sum over (k, c) of kernels[o, k, c] * input[c, l moved by k],
// with no columns buffer (im2col's columns were 2.6x the GEMM's time at N=16, C=256, 32x32).
// The host makes the input channels-last and the kernels kernel-point-major (dk_mma_operands),
// so a stage of the reduction, BK channels of one kernel point, is a run of 16-byte vectors in
// both operands, copied by cp.async straight into shared memory (zeros for the padding and
// past the last channel) STAGES - 1 stages ahead of the tensor cores.
// ---------------------------------------------------------------------------------------------

namespace dk_mma {
constexpr int BM = 128;  // output channels of a block tile
constexpr int BN = 128;  // output positions of a block tile
constexpr int BK = 64;   // channels of one kernel point per stage
constexpr int STAGES = 3;
// 4 warps, 2 (channels) x 2 (positions), each WM x WN of the tile, 32 independent MMAs per step
// of 16 channels. At N=16, C=256, 32x32 on an H200 both this and 8 warps of 64 x 32 took 69 us
// with the tensor pipes 47-49% active (Nsight Compute); 8 warps stalled most on ldmatrix
// results, these on fixed-latency dependencies.
constexpr int WARPS_M = 2, WARPS_N = 2, THREADS = 32 * WARPS_M * WARPS_N;
constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MI = WM / 16, NI = WN / 8;
// Row pitch of the shared tiles in elements: 144 bytes, so the 8 rows one ldmatrix reads fall
// in 8 distinct 16-byte bank groups.
constexpr int PITCH = BK + 8;
constexpr int TILE = BM * PITCH;  // elements of one stage's A (or B) tile
constexpr int COPIES = BM * BK / 8 / THREADS;  // 16-byte copies of a tile per thread and stage
constexpr int ROWS_APART = THREADS / (BK / 8);  // between one thread's copies
// The epilogue stages the block's outputs in the same memory, rows of BN + 8 elements.
constexpr int OUT_PITCH = BN + 8;
constexpr int SHARED_BYTES = STAGES * 2 * TILE * 2;  // MMA_SHARED_BYTES in the host
static_assert(BM == BN && BM * OUT_PITCH <= STAGES * 2 * TILE, "the output tile fits the pipeline's memory");
static_assert(SHARED_BYTES <= 113 * 1024, "two blocks fit an SM (sm_80 and sm_90: 227 KiB)");
static_assert(NI % 2 == 0, "an ldmatrix_x4 reads the B fragments of two 8-column tiles");
// The input gradient's A tile (TRANSPOSED) is stored k-major, [BK][T_PITCH]: 272-byte rows,
// so the 8 rows one ldmatrix reads again fall in 8 distinct bank groups; a thread copies rows
// T_ROWS_APART apart, 8 output channels each.
constexpr int T_PITCH = BM + 8;
constexpr int T_ROWS_APART = THREADS / (BM / 8);
static_assert(BK * T_PITCH <= TILE && BK / T_ROWS_APART == COPIES, "the transposed tile fits, in as many copies");
}  // namespace dk_mma

// kernels[n, o, k, c], kernel-point-major for dk_global_mma: dk_resample's samples. A block per
// (output channel o, slice of `slice` of its input channels, pass of `pass` images) copies o's
// scope for the slice into shared memory as (S, slice), computes the pass's kernel points'
// taps once (into shared memory too), and samples 8 channels per thread: a tap is one 16-byte
// read, an output one 16-byte store. (A thread per (n, o, k) computing its own taps
// spent most of its instructions on them; reading the scope in place, (C_out, Cg, S), makes
// every load a gather.)

// Units first, first + step, ... of the (o, slice, pass) units.
template <typename T>
__device__ __forceinline__ void resample_cl(const T* __restrict__ weight, const T* __restrict__ offset, int slice,
                                            int pass, const DkGeometry& geo, T* __restrict__ kernels,
                                            unsigned char* shared, index_t first, index_t step) {
    const index_t batch = geo.batch, c_out = geo.c_out, offset_groups = geo.offset_groups;
    const int K = (int)geo.K(), S = (int)geo.scope();
    ScopeTap<float>* const taps = reinterpret_cast<ScopeTap<float>*>(shared);  // [pass][K]
    T* const scope = reinterpret_cast<T*>(taps + pass * K);  // [S][slice]
    const index_t cg = geo.cg(), slices = (cg + slice - 1) / slice, passes = (batch + pass - 1) / pass;
    for (index_t unit = first; unit < c_out * slices * passes; unit += step) {
        const index_t os = fast_div(unit, passes), o = fast_div(os, slices);
        const index_t c0 = (os - o * slices) * slice, n0 = (unit - os * passes) * pass;
        const int width = (int)min((index_t)slice, cg - c0), chunks = width / 8;
        const int images = (int)min((index_t)pass, batch - n0);
        const index_t g = fast_div(o, geo.opg());
        __syncthreads();  // the previous unit is done with the shared memory
        // The slice's scopes are contiguous: 16-byte loads (cg, c0 multiples of 8), each scattered
        // over the 8 (s, c) it holds. (Loads in (s, c) order, a channel's 32 bytes per lane, kept
        // L1 the busiest unit.)
        const uint4* src = reinterpret_cast<const uint4*>(weight + (o * cg + c0) * S);
        for (int v = threadIdx.x; v < width * S / 8; v += blockDim.x) {
            const uint4 raw = __ldg(src + v);
            const T* e8 = reinterpret_cast<const T*>(&raw);
            int c = div32(v * 8, S), s = v * 8 - c * S;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                scope[s * slice + c] = e8[e];
                if (++s == S) s = 0, ++c;
            }
        }
        for (int j = threadIdx.x; j < images * K; j += blockDim.x) {
            const int m = div32(j, K), k = j - m * K;
            taps[j] = ScopeTap<float>(geo, offset + 2 * (((n0 + m) * offset_groups + g) * K + k), k);
        }
        __syncthreads();
        for (int j = threadIdx.x; j < images * K * chunks; j += blockDim.x) {
            const int mk = div32(j, chunks), c = (j - mk * chunks) * 8, m = div32(mk, K), k = mk - m * K;
            const ScopeTap<float>& t = taps[mk];
            float v[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = 0.0f;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                if (t.at[q] < 0) continue;
                const uint4 raw = *reinterpret_cast<const uint4*>(scope + t.at[q] * slice + c);
                const T* e8 = reinterpret_cast<const T*>(&raw);
#pragma unroll
                for (int e = 0; e < 8; ++e) v[e] += t.weight[q] * to_acc(e8[e]);
            }
            __align__(16) T packed[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) packed[e] = from_acc<T>(v[e]);
            *reinterpret_cast<uint4*>(kernels + (((n0 + m) * c_out + o) * K + k) * cg + c0 + c) =
                *reinterpret_cast<const uint4*>(packed);
        }
    }
}

// The backward's table of the scope's taps for dk_resample_grad_sums (below, beside it).
template <typename T>
__device__ void scope_taps(const T* __restrict__ offset, const DkGeometry& geo, float* __restrict__ taps,
                           index_t first, index_t step);

// What dk_global_mma reads, made in one launch (independent jobs, which then overlap): the
// first `layout_blocks` blocks make the input channels-last (tensor_core.cuh), into input_cl
// unless null, then grad_output (N, C_out, H_out, W_out), into grad_output_cl unless null: the
// forward's input, the backward's grad_output for its input gradient and input for its
// kernels' gradient (dk_global_wgmma); the next `taps_blocks` (the backward) make the scope's
// taps (scope_taps); the others resample the kernels (resample_cl). Dynamic shared memory: the
// larger of the jobs'.
template <typename T>
__global__ void __launch_bounds__(256) dk_mma_operands(const T* __restrict__ input, const T* __restrict__ grad_output,
                                                       const T* __restrict__ weight, const T* __restrict__ offset,
                                                       int slice, int pass, int layout_blocks, int taps_blocks,
                                                       DK_GEOMETRY, T* __restrict__ input_cl,
                                                       T* __restrict__ grad_output_cl, T* __restrict__ kernels,
                                                       float* __restrict__ taps) {
    DK_GEO;
    extern __shared__ __align__(16) unsigned char dk_shared[];
    const int block = (int)blockIdx.x;
    if (block < layout_blocks) {
        if (input_cl != nullptr) {
            channels_last(input, batch, channels, geo.hw(), input_cl, dk_shared, block, layout_blocks);
        }
        if (grad_output_cl != nullptr) {
            channels_last(grad_output, batch, c_out, geo.L(), grad_output_cl, dk_shared, block, layout_blocks);
        }
    } else if (block < layout_blocks + taps_blocks) {
        scope_taps(offset, geo, taps, block - layout_blocks, taps_blocks);
    } else {
        const int lead = layout_blocks + taps_blocks;
        resample_cl(weight, offset, slice, pass, geo, kernels, dk_shared, block - lead, gridDim.x - lead);
    }
}

// The implicit GEMMs' (dk_global_mma, dk_global_wgmma) pieces of B, the input on the rigid grid:
// rigid[p] = the input row and column of kernel point (0, 0) at position first + p, p < COUNT
// (a row no point brings inside past L), made by the block between two barriers.
template <int COUNT, int THREADS>
__device__ __forceinline__ void dk_rigid_rows(int2* rigid, index_t first, index_t L, index_t out_w, int sh, int sw,
                                              int ph, int pw) {
    __syncthreads();  // the previous users of rigid are done
    for (int p = threadIdx.x; p < COUNT; p += THREADS) {
        const index_t l = first + p;
        const int y = (int)(l / out_w), x = (int)(l - (index_t)y * out_w);
        rigid[p] = l < L ? make_int2(y * sh - ph, x * sw - pw) : make_int2(-(1 << 30), 0);
    }
    __syncthreads();
}

// A thread's B rows rigid[first + apart * t] at kernel point k: their offsets in the
// channels-last image (0 outside it) and, as the returned bits, which lie inside.
template <int COPIES>
__device__ __forceinline__ unsigned dk_rigid_taps(const int2* rigid, int first, int apart, int k, int kw, int dh,
                                                  int dw, index_t height, index_t width, index_t channels,
                                                  int off[COPIES]) {
    const int i = k / kw, j = k - i * kw;
    unsigned valid = 0;
#pragma unroll
    for (int t = 0; t < COPIES; ++t) {
        const int2 p = rigid[first + apart * t];
        const int iy = p.x + i * dh, ix = p.y + j * dw;
        const bool ok = iy >= 0 && iy < (int)height && ix >= 0 && ix < (int)width;
        off[t] = ok ? (iy * (int)width + ix) * (int)channels : 0;
        valid |= (unsigned)ok << t;
    }
    return valid;
}

// Those rows' 16 bytes at channel c0 into dst + step * t, zeros for rows outside the image or
// where !c_ok (cp.async, not committed).
template <int COPIES, typename T>
__device__ __forceinline__ void dk_copy_rows(T* dst, int step, const T* src, const int off[COPIES], unsigned valid,
                                             bool c_ok, int c0, const T* any) {
#pragma unroll
    for (int t = 0; t < COPIES; ++t) {
        const bool b = c_ok && (valid >> t & 1);
        copy_async_16(dst + step * t, b ? src + off[t] + c0 : any, b);
    }
}

// A block per (image, weight group, tile of BM output channels, tile of BN positions),
// grid-stride. `input` is (N, H, W, C_in), `kernels` (N, C_out, K, Cg); every in-plane
// coordinate and K * Cg fit 32 bits (the host checks). Output plus bias, rounded once.
// Each thread copies the same rows of every stage; it keeps their source pointers and moves
// them by BK channels a stage, recomputing the input's only at a new kernel point (address
// arithmetic per copy and stage was two thirds of the loop's instructions).
// TRANSPOSED: the backward's input gradient at stride 1, the convolution of grad_output (made
// channels-last) with the kernels flipped and transposed within each group, read in place from
// the forward's layout: the geometry is the transposed convolution's (channels = C_out, c_out
// = C_in, padding (k - 1) * dilation - padding, out_size the input's; _transposed in the host),
// and A's tile is a run of og input channels of BK rows (output channels of the forward),
// copied as it lies and read by ldmatrix.trans. No bias.
template <typename T, bool TRANSPOSED>
__global__ void __launch_bounds__(dk_mma::THREADS, 2)
dk_global_mma(const T* __restrict__ input, const T* __restrict__ kernels, const T* __restrict__ bias, int use_bias,
              DK_GEOMETRY, T* __restrict__ out) {
    using namespace dk_mma;
    DK_GEO;
    extern __shared__ __align__(16) unsigned char dk_shared[];
    T* const a_base = reinterpret_cast<T*>(dk_shared);  // STAGES tiles [BM][PITCH] of kernels
    T* const b_base = a_base + STAGES * TILE;           // STAGES tiles [BN][PITCH] of the input
    // Input row and column of kernel point (0, 0) for each position of the tile; past L, a row
    // no kernel point brings inside the image (the host bounds (kh - 1) * dh by 2**30).
    __shared__ int2 rigid[BN];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warp_m = warp % WARPS_M, warp_n = warp / WARPS_M;
    const index_t cg = geo.cg(), og = geo.og(), L = geo.L();
    const int K = kh * kw;
    const index_t m_tiles = (og + BM - 1) / BM, n_tiles = (L + BN - 1) / BN;
    const int stages = K * (int)((cg + BK - 1) / BK);
    // This thread's copies of every stage: rows row + ROWS_APART * t of both tiles, 8 channels
    // from `chunk`.
    const int row = tid / (BK / 8), chunk = tid % (BK / 8) * 8;
    // TRANSPOSED: this thread's copies of A, rows a_row + T_ROWS_APART * t, 8 channels from a_chunk.
    const int a_row = tid / (BM / 8), a_chunk = tid % (BM / 8) * 8;
    // Where warp lane reads its ldmatrix rows: A (row-major, or k-major for ldmatrix.trans) and B
    // (column-major) fragments; the steps to the next 16 rows and to column kk of A.
    const int a_read = TRANSPOSED ? ((lane & 7) + ((lane >> 4) << 3)) * T_PITCH + warp_m * WM + ((lane >> 3) & 1) * 8
                                  : (warp_m * WM + (lane & 15)) * PITCH + (lane >> 4) * 8;
    constexpr int a_mi = TRANSPOSED ? 16 : 16 * PITCH, a_kk = TRANSPOSED ? T_PITCH : 1;
    const int b_read = (warp_n * WN + (lane & 7) + ((lane >> 4) << 3)) * PITCH + ((lane >> 3) & 1) * 8;

    for (index_t tile = blockIdx.x; tile < batch * groups * m_tiles * n_tiles; tile += gridDim.x) {
        const index_t ngm = fast_div(tile, n_tiles), ng = fast_div(ngm, m_tiles);
        const index_t n = fast_div(ng, groups), g = ng - n * groups;
        const index_t o0 = (ngm - ng * m_tiles) * BM, l0 = (tile - ngm * n_tiles) * BN;

        dk_rigid_rows<BN, THREADS>(rigid, l0, L, out_w, sh, sw, ph, pw);  // after the previous tile

        const T* const a_src = TRANSPOSED ? kernels + ((n * channels + g * cg + a_row) * K) * og + o0 + a_chunk
                                          : kernels + ((n * c_out + g * og + o0 + row) * K) * cg + chunk;
        const index_t a_step = TRANSPOSED ? (index_t)T_ROWS_APART * K * og : (index_t)ROWS_APART * K * cg;
        const int a_rows = (int)min((index_t)BM, og - o0);
        const T* const b_src = input + n * height * width * channels + g * cg + chunk;
        int b_off[COPIES];  // of this thread's input rows from b_src (an image fits 32 bits)
        unsigned b_valid = 0;
        int k = 0, c0 = 0;  // the next stage to load
        auto point = [&]() {  // b_off and b_valid at kernel point k
            b_valid = dk_rigid_taps<COPIES>(rigid, row, ROWS_APART, k, kw, dh, dw, height, width, channels, b_off);
        };
        point();
        auto load_next = [&](int buf) {
            const bool c_ok = c0 + chunk < cg;
            T* const b_dst = b_base + buf * TILE + row * PITCH + chunk;
            if constexpr (TRANSPOSED) {
                // Rows c0 + a_row + T_ROWS_APART * t of kernel point K - 1 - k (the flip).
                const index_t a_off = ((index_t)c0 * K + (K - 1 - k)) * og;
                T* const a_dst = a_base + buf * TILE + a_row * T_PITCH + a_chunk;
                const bool cols_ok = a_chunk < a_rows;
#pragma unroll
                for (int t = 0; t < COPIES; ++t) {
                    const bool a = cols_ok && c0 + a_row + T_ROWS_APART * t < cg;
                    copy_async_16(a_dst + T_ROWS_APART * t * T_PITCH, a ? a_src + t * a_step + a_off : kernels, a);
                }
            } else {
                const int a_off = k * (int)cg + c0;
                T* const a_dst = a_base + buf * TILE + row * PITCH + chunk;
#pragma unroll
                for (int t = 0; t < COPIES; ++t) {
                    const bool a = c_ok && row + ROWS_APART * t < a_rows;
                    copy_async_16(a_dst + ROWS_APART * t * PITCH, a ? a_src + t * a_step + a_off : kernels, a);
                }
            }
            dk_copy_rows<COPIES>(b_dst, ROWS_APART * PITCH, b_src, b_off, b_valid, c_ok, c0, input);
            c0 += BK;
            if (c0 >= cg) {
                c0 = 0;
                if (++k < K) point();
            }
        };

#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < stages) load_next(s);
            copy_async_commit();
        }
        float accum[MI][NI][4];
#pragma unroll
        for (int a = 0; a < MI; ++a)
#pragma unroll
            for (int b = 0; b < NI; ++b)
#pragma unroll
                for (int c = 0; c < 4; ++c) accum[a][b][c] = 0.0f;

        // The fragments of step kk of a stage into set f: the tensor cores multiply one set while
        // the next is read.
        unsigned af[2][MI][4], bf[2][NI][2];
        auto fragments = [&](const T* a_tile, const T* b_tile, int kk, int f) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                if constexpr (TRANSPOSED) {
                    ldmatrix_x4_trans(af[f][mi], a_tile + a_read + mi * a_mi + kk * a_kk);
                } else {
                    ldmatrix_x4(af[f][mi], a_tile + a_read + mi * a_mi + kk * a_kk);
                }
            }
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                unsigned r[4];
                ldmatrix_x4(r, b_tile + b_read + nj * 16 * PITCH + kk);
                bf[f][2 * nj][0] = r[0], bf[f][2 * nj][1] = r[1], bf[f][2 * nj + 1][0] = r[2], bf[f][2 * nj + 1][1] = r[3];
            }
        };

        for (int s = 0; s < stages; ++s) {
            copy_async_wait<STAGES - 2>();
            // Stage s has landed for every thread, and every warp is done with stage s - 1, whose
            // buffer the next load overwrites.
            __syncthreads();
            if (s + STAGES - 1 < stages) load_next((s + STAGES - 1) % STAGES);
            copy_async_commit();
            const T* const a_tile = a_base + (s % STAGES) * TILE;
            const T* const b_tile = b_base + (s % STAGES) * TILE;
            fragments(a_tile, b_tile, 0, 0);
#pragma unroll
            for (int step = 0; step < BK / 16; ++step) {
                if (step + 1 < BK / 16) fragments(a_tile, b_tile, (step + 1) * 16, (step + 1) & 1);
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni) Mma<T>::run(accum[mi][ni], af[step & 1][mi], bf[step & 1][ni]);
            }
        }

        // Epilogue: plus bias, rounded to T into a shared tile, then stored a row of positions
        // at a time (16-byte vectors where the rows are aligned to them).
        copy_async_wait<0>();
        __syncthreads();
        T* const out_tile = a_base;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = warp_m * WM + mi * 16 + (lane >> 2) + half * 8;
                const float add = use_bias && o0 + r < og ? to_acc(bias[g * og + o0 + r]) : 0.0f;
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        out_tile[r * OUT_PITCH + warp_n * WN + ni * 8 + (lane & 3) * 2 + e] =
                            from_acc<T>(accum[mi][ni][half * 2 + e] + add);
            }
        __syncthreads();
        store_tile(out_tile, OUT_PITCH, BM, BN, a_rows, out, n * c_out + g * og + o0, l0, L, THREADS);
    }
}

// dk_global_mma on Hopper's warpgroup MMA (sm_90a), and the backward's two other products as
// implicit GEMMs of the same shape: tiles of BM x BN outputs, reductions in stages of BK,
// 2 warpgroups (64 rows of the tile each), the stages in shared memory in wgmma's 128-byte
// swizzle. DK_WG_MODE:
// - FORWARD: out[n, o, l] = sum over (k, c) of kernels[n, o, k, c] * input[n, l moved by k, c]:
//   `a` the kernels (N, C_out, K, Cg), `b` the input channels-last (N, H, W, C_in), `out` T
//   (N, C_out, H_out, W_out); stages of BK channels of one kernel point.
// - INPUT_GRAD: the transposed convolution of dk_global_mma's TRANSPOSED: `a` the same kernels,
//   read as a run of og input channels by BK rows (MN-major), `b` grad_output channels-last, the
//   transposed geometry, no bias.
// - KERNEL_GRAD: grad_kernels[n, o, k, c] = sum over l of grad_output[n, o, l] * input[n, l moved
//   by k, c]: `a` grad_output (N, C_out, L) with L a multiple of 8 (rows of 16-byte vectors), `b`
//   the input channels-last (rows of positions, MN-major), `out` float (N, C_out, K, Cg); a tile
//   is BM output channels by BN channels of one kernel point, its stages BK positions.
enum DkWgMode { DK_WG_FORWARD = 0, DK_WG_INPUT_GRAD = 1, DK_WG_KERNEL_GRAD = 2 };
namespace dk_wgmma {
constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3;
constexpr int THREADS = 256;
constexpr int TILE = BM * BK;  // elements of one operand's tile of a stage (BN == BM)
// A thread's 16-byte copies of a tile per stage, rows ROWS_APART apart in a K-major tile (rows
// of BK elements) and MN_ROWS_APART apart in an MN-major one (rows of BM, two 64-wide halves).
constexpr int COPIES = TILE / 8 / THREADS;
constexpr int ROWS_APART = THREADS / (BK / 8), MN_ROWS_APART = THREADS / (BM / 8);
constexpr int HALF = 64 * BK;  // an MN-major tile's second half of 64 columns starts here
// 1024 bytes of slack to align the tiles to the swizzle's atoms, then the stages, then `rigid`.
constexpr int SHARED_BYTES = 1024 + STAGES * 2 * TILE * 2 + BN * 8;  // WGMMA_SHARED_BYTES in the host
static_assert(BM == BN && ROWS_APART * COPIES == BM && MN_ROWS_APART * COPIES == BK, "both mappings copy whole tiles");
static_assert(SHARED_BYTES <= 113 * 1024, "two blocks fit an SM");
static_assert(BM * (BN + 4) * 4 <= STAGES * 2 * TILE * 2, "the output tile (float) fits the pipeline's memory");
}  // namespace dk_wgmma

template <typename T, int MODE>
__global__ void __launch_bounds__(dk_wgmma::THREADS, 2)
dk_global_wgmma(const T* __restrict__ b_in, const T* __restrict__ a_in, const T* __restrict__ bias, int use_bias,
                DK_GEOMETRY, void* __restrict__ out) {
#if CUDEFORM_WGMMA
    using namespace dk_wgmma;
    constexpr bool A_MN = MODE == DK_WG_INPUT_GRAD, B_MN = MODE == DK_WG_KERNEL_GRAD;
    DK_GEO;
    extern __shared__ __align__(16) unsigned char dk_shared[];
    T* const a_base = reinterpret_cast<T*>(dk_shared + ((1024 - (shared_address(dk_shared) & 1023)) & 1023));
    T* const b_base = a_base + STAGES * TILE;
    // Input row and column of kernel point (0, 0) for each output position of the tile (the
    // reduction's positions of the stage in KERNEL_GRAD); past L, a row no point brings inside.
    int2* const rigid = reinterpret_cast<int2*>(b_base + STAGES * TILE);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
    const index_t cg = geo.cg(), og = geo.og(), L = geo.L();
    const int K = kh * kw;
    // A K-major tile's copies: rows k_row + ROWS_APART * t, 8 elements from k_chunk; an MN-major
    // one's: rows mn_row + MN_ROWS_APART * t, 8 elements from mn_chunk. Where they land (the
    // same for every t: the swizzle repeats every 8 rows).
    const int k_row = tid / (BK / 8), k_chunk = tid % (BK / 8) * 8;
    const int mn_row = tid / (BM / 8), mn_chunk = tid % (BM / 8) * 8;
    const int k_at = swizzled(k_row, k_chunk), mn_at = (mn_chunk >> 6) * HALF + swizzled(mn_row, mn_chunk & 63);
    const int b_row = B_MN ? mn_row : k_row, b_rows_apart = B_MN ? MN_ROWS_APART : ROWS_APART;
    const int b_chunk = B_MN ? mn_chunk : k_chunk;
    const index_t m_tiles = (og + BM - 1) / BM;
    const index_t c_tiles = (cg + BN - 1) / BN;  // KERNEL_GRAD's tiles of one kernel point
    const index_t n_tiles = MODE == DK_WG_KERNEL_GRAD ? K * c_tiles : (L + BN - 1) / BN;
    const int stages = MODE == DK_WG_KERNEL_GRAD ? (int)((L + BK - 1) / BK) : K * (int)((cg + BK - 1) / BK);

    for (index_t tile = blockIdx.x; tile < batch * groups * m_tiles * n_tiles; tile += gridDim.x) {
        const index_t ngm = fast_div(tile, n_tiles), ng = fast_div(ngm, m_tiles);
        const index_t n = fast_div(ng, groups), g = ng - n * groups;
        const index_t o0 = (ngm - ng * m_tiles) * BM, nt = tile - ngm * n_tiles;
        const int a_rows = (int)min((index_t)BM, og - o0);
        // FORWARD, INPUT_GRAD: positions l0 + [0, BN) of the outputs; KERNEL_GRAD: channels c0n
        // + [0, BN) of kernel point kt.
        const int kt = MODE == DK_WG_KERNEL_GRAD ? (int)fast_div(nt, c_tiles) : 0;
        const index_t l0 = MODE == DK_WG_KERNEL_GRAD ? 0 : nt * BN;
        const index_t c0n = MODE == DK_WG_KERNEL_GRAD ? (nt - kt * c_tiles) * BN : 0;

        auto rigid_rows = [&](index_t first) { dk_rigid_rows<BN, THREADS>(rigid, first, L, out_w, sh, sw, ph, pw); };
        if (MODE != DK_WG_KERNEL_GRAD) rigid_rows(l0);

        // The sources of this thread's copies: A's rows and B's (their offsets from b_src moved
        // to the next kernel point, or the next stage's positions in KERNEL_GRAD).
        const T* a_src;
        index_t a_step;
        if constexpr (MODE == DK_WG_FORWARD) {
            a_src = a_in + ((n * c_out + g * og + o0 + k_row) * K) * cg + k_chunk;
            a_step = (index_t)ROWS_APART * K * cg;
        } else if constexpr (MODE == DK_WG_INPUT_GRAD) {
            a_src = a_in + ((n * channels + g * cg + mn_row) * K) * og + o0 + mn_chunk;
            a_step = (index_t)MN_ROWS_APART * K * og;
        } else {
            a_src = a_in + (n * c_out + g * og + o0 + k_row) * L + k_chunk;
            a_step = (index_t)ROWS_APART * L;
        }
        const T* const b_src = b_in + n * height * width * channels + g * cg + b_chunk + c0n;
        int b_off[COPIES];
        unsigned b_valid = 0;
        int k = MODE == DK_WG_KERNEL_GRAD ? kt : 0, c0 = 0;  // the next stage: kernel point, channel
        index_t p0 = 0;                                     // KERNEL_GRAD: the next stage's positions
        auto point = [&]() {  // b_off and b_valid of B's rows at kernel point k
            b_valid = dk_rigid_taps<COPIES>(rigid, (MODE == DK_WG_KERNEL_GRAD ? (int)(p0 & (2 * BK - 1)) : 0) + b_row,
                                            b_rows_apart, k, kw, dh, dw, height, width, channels, b_off);
        };
        if (MODE != DK_WG_KERNEL_GRAD) point();
        auto load_next = [&](int buf) {
            T* const a_dst = a_base + buf * TILE + (A_MN ? mn_at : k_at);
            T* const b_dst = b_base + buf * TILE + (B_MN ? mn_at : k_at);
            if constexpr (MODE == DK_WG_KERNEL_GRAD) {
                // rigid holds two stages' positions, BK each, refreshed every other stage.
                if ((p0 & (2 * BK - 1)) == 0) rigid_rows(p0);
                point();
                const bool c_ok = c0n + b_chunk < cg;
#pragma unroll
                for (int t = 0; t < COPIES; ++t) {
                    const bool a = k_row + ROWS_APART * t < a_rows && p0 + k_chunk < L;
                    copy_async_16(a_dst + ROWS_APART * t * 64, a ? a_src + t * a_step + p0 : a_in, a);
                    const bool b = c_ok && (b_valid >> t & 1);
                    copy_async_16(b_dst + MN_ROWS_APART * t * 64, b ? b_src + b_off[t] : b_in, b);
                }
                p0 += BK;
                return;
            } else {
                const bool c_ok = c0 + k_chunk < cg;
                if constexpr (A_MN) {
                    // Rows c0 + mn_row + MN_ROWS_APART * t of kernel point K - 1 - k (the flip).
                    const index_t a_off = ((index_t)c0 * K + (K - 1 - k)) * og;
#pragma unroll
                    for (int t = 0; t < COPIES; ++t) {
                        const bool a = mn_chunk < a_rows && c0 + mn_row + MN_ROWS_APART * t < cg;
                        copy_async_16(a_dst + MN_ROWS_APART * t * 64, a ? a_src + t * a_step + a_off : a_in, a);
                    }
                } else {
                    const int a_off = k * (int)cg + c0;
#pragma unroll
                    for (int t = 0; t < COPIES; ++t) {
                        const bool a = c_ok && k_row + ROWS_APART * t < a_rows;
                        copy_async_16(a_dst + ROWS_APART * t * 64, a ? a_src + t * a_step + a_off : a_in, a);
                    }
                }
                dk_copy_rows<COPIES>(b_dst, ROWS_APART * 64, b_src, b_off, b_valid, c_ok, c0, b_in);
                c0 += BK;
                if (c0 >= cg) {
                    c0 = 0;
                    if (++k < K) point();
                }
            }
        };

#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < stages) load_next(s);
            copy_async_commit();
        }
        float accum[64];
#pragma unroll
        for (int e = 0; e < 64; ++e) accum[e] = 0.0f;

        for (int s = 0; s < stages; ++s) {
            copy_async_wait<STAGES - 2>();
            fence_proxy_async();
            // Stage s has landed for every thread; every warpgroup is done with stage s - 1.
            __syncthreads();
            if (s + STAGES - 1 < stages) load_next((s + STAGES - 1) % STAGES);
            copy_async_commit();
            // This warpgroup's 64 rows of A (K-major: the next 16 of the reduction 32 bytes on;
            // MN-major: its own half, the next 16 rows 2 atoms on), and all of B (MN-major: its
            // second half of columns HALF elements on).
            const unsigned long long a_desc = wgmma_desc(a_base + (s % STAGES) * TILE + wg * 64 * BK, 1024, 16);
            const unsigned long long b_desc = wgmma_desc(b_base + (s % STAGES) * TILE, 1024, B_MN ? HALF * 2 : 16);
#pragma unroll
            for (int e = 0; e < 64; ++e) wgmma_operand(accum[e]);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk)
                Wgmma<T, 128, A_MN, B_MN>::run(accum, a_desc + (A_MN ? kk * 128 : kk * 2),
                                          b_desc + (B_MN ? kk * 128 : kk * 2));
            wgmma_commit();
            wgmma_wait<0>();
#pragma unroll
            for (int e = 0; e < 64; ++e) wgmma_operand(accum[e]);
        }

        // Epilogue: the accumulators (thread: rows r and r + 8 of its warp's 16, two columns of
        // each 8) into a shared tile, then stored a row at a time in 16-byte vectors where rows
        // are whole vectors.
        copy_async_wait<0>();
        __syncthreads();
        if constexpr (MODE == DK_WG_KERNEL_GRAD) {
            const int r_lane = wg * 64 + (warp & 3) * 16 + (lane >> 2), c_lane = (lane & 3) * 2;
            constexpr int PITCH = BN + 4;
            float* const tile_out = reinterpret_cast<float*>(a_base);
#pragma unroll
            for (int half = 0; half < 2; ++half)
#pragma unroll
                for (int j = 0; j < 16; ++j)
                    *reinterpret_cast<float2*>(tile_out + (r_lane + half * 8) * PITCH + j * 8 + c_lane) =
                        make_float2(accum[4 * j + half * 2], accum[4 * j + half * 2 + 1]);
            __syncthreads();
            float* const grad = static_cast<float*>(out);
            for (int v = tid; v < BM * BN / 4; v += THREADS) {
                const int r = v / (BN / 4), col = v % (BN / 4) * 4;
                if (o0 + r >= og || c0n + col >= cg) continue;
                *reinterpret_cast<float4*>(grad + ((n * c_out + g * og + o0 + r) * K + kt) * cg + c0n + col) =
                    *reinterpret_cast<const float4*>(tile_out + r * PITCH + col);
            }
        } else {
            constexpr int PITCH = BN + 8;
            T* const tile_out = a_base;
            stage_accumulators<T, BN>(accum, bias + g * og + o0, use_bias, a_rows, tile_out, PITCH);
            __syncthreads();
            store_tile(tile_out, PITCH, BM, BN, a_rows, static_cast<T*>(out), n * c_out + g * og + o0, l0, L,
                       THREADS);
        }
    }
#endif
}

// Where dk_global_conv reads one channel's input window of its tile: `at(r, q)` is the element
// r rows and q columns past the thread's first input. Staged: the window in shared memory with
// its zero border, read with no checks. Plane: the channel's plane itself, with the bounds
// checks the border replaces, for windows too large for shared memory (huge dilations).
template <typename A>
struct StagedWindow {
    const A* p;
    int pitch;
    __device__ __forceinline__ A at(int r, int q) const { return p[r * pitch + q]; }
};

template <typename A, typename T>
struct PlaneWindow {
    const T* plane;
    int y, x, height, width;
    __device__ __forceinline__ A at(int r, int q) const {
        const int iy = y + r, ix = x + q;
        const bool inside = (unsigned)iy < (unsigned)height && (unsigned)ix < (unsigned)width;
        return inside ? to_acc(plane[iy * width + ix]) : A(0);
    }
};

// sum[v] += one channel's kernel `kern` (kh x kw) applied at the window's output v, v * sh rows
// down, kernel points column by column. UNIT (sh = dh = 1): outputs one above the other share
// all but one of a kernel column's inputs, which slide through registers, DK_SPAN + kh - 1
// reads per kernel column rather than DK_SPAN * kh (shared-memory reads bound this loop).
template <bool UNIT, typename A, typename Window>
__device__ __forceinline__ void span_dot_any(const Window& win, const A* kern, int kh, int kw, int sh, int dh,
                                             int dw, A (&sum)[DK_SPAN]) {
    for (int j = 0; j < kw; ++j) {
        const int q = j * dw;
        if (UNIT) {
            A taps[DK_SPAN];
#pragma unroll
            for (int v = 0; v < DK_SPAN; ++v) taps[v] = win.at(v, q);
            for (int i = 0; i < kh; ++i) {
                const A k = kern[i * kw + j];
#pragma unroll
                for (int v = 0; v < DK_SPAN; ++v) sum[v] += taps[v] * k;
                if (i + 1 < kh) {
#pragma unroll
                    for (int v = 0; v + 1 < DK_SPAN; ++v) taps[v] = taps[v + 1];
                    taps[DK_SPAN - 1] = win.at(DK_SPAN + i, q);
                }
            }
        } else {
            for (int i = 0; i < kh; ++i) {
                const A k = kern[i * kw + j];
#pragma unroll
                for (int v = 0; v < DK_SPAN; ++v) sum[v] += win.at(v * sh + i * dh, q) * k;
            }
        }
    }
}

// span_dot's UNIT case for a kernel KH rows high (KH known when compiled): a kernel column's
// DK_SPAN + KH - 1 inputs are read into registers once and every product reads them in place,
// with none of the copies that sliding them costs at a run-time height.
template <int KH, typename A, typename Window>
__device__ __forceinline__ void span_dot_rows(const Window& win, const A* kern, int kw, int dw, A (&sum)[DK_SPAN]) {
    for (int j = 0; j < kw; ++j) {
        const int q = j * dw;
        A taps[DK_SPAN + KH - 1];
#pragma unroll
        for (int v = 0; v < DK_SPAN + KH - 1; ++v) taps[v] = win.at(v, q);
#pragma unroll
        for (int i = 0; i < KH; ++i) {
            const A k = kern[i * kw + j];
#pragma unroll
            for (int v = 0; v < DK_SPAN; ++v) sum[v] += taps[v + i] * k;
        }
    }
}

// KH: the kernel's height when the host knows it (kh = KH), or 0.
template <int KH, typename A, typename Window>
__device__ __forceinline__ void span_dot(const Window& win, const A* kern, int kh, int kw, int sh, int dh, int dw,
                                         A (&sum)[DK_SPAN]) {
    if (sh == 1 && dh == 1) {
        if (KH > 0) {
            span_dot_rows<KH>(win, kern, kw, dw, sum);
        } else {
            span_dot_any<true>(win, kern, kh, kw, sh, dh, dw, sum);
        }
    } else {
        span_dot_any<false>(win, kern, kh, kw, sh, dh, dw, sum);
    }
}

// One tile of the direct kernels' grid: rows x cols outputs from (y0, x0) of the (image n,
// output channel o) plane `no`, tile t of the plane's (row-major), and the input window they
// read, win_h x win_w inputs from (iy0, ix0), its rows rounded up to whole spans of DK_SPAN.
struct DirectTile {
    index_t no;
    int n, o, t, y0, x0, rows, cols, win_h, win_w, iy0, ix0;
};

// for_each_tile's loop in I arithmetic.
template <typename I, typename F>
__device__ __forceinline__ void for_each_tile_in(const DkGeometry& geo, int tile_h, int tile_w, F f) {
    const int OH = (int)geo.out_h, OW = (int)geo.out_w;
    const int tiles_x = ceil_div(OW, tile_w);
    const I tiles = (I)ceil_div(OH, tile_h) * tiles_x;
    for (I unit = blockIdx.x; unit < (I)(geo.batch * geo.c_out) * tiles; unit += gridDim.x) {
        DirectTile d;
        const I no = quotient(unit, tiles), n = quotient(no, (I)geo.c_out);
        d.no = no;
        d.n = (int)n;
        d.o = (int)(no - n * (I)geo.c_out);
        d.t = (int)(unit - no * tiles);
        const int by = div32(d.t, tiles_x);
        d.y0 = by * tile_h;
        d.x0 = (d.t - by * tiles_x) * tile_w;
        d.rows = min(tile_h, OH - d.y0);
        d.cols = min(tile_w, OW - d.x0);
        d.win_h = (ceil_div(d.rows, DK_SPAN) * DK_SPAN - 1) * geo.sh + (geo.kh - 1) * geo.dh + 1;
        d.win_w = (d.cols - 1) * geo.sw + (geo.kw - 1) * geo.dw + 1;
        d.iy0 = d.y0 * geo.sh - geo.ph;
        d.ix0 = d.x0 * geo.sw - geo.pw;
        f(d);
    }
}

// f(tile) for each of this block's tiles of tile_h x tile_w outputs, over every (image, output
// channel) plane, the units counted in int where every unit index fits (`small`, from the
// host), since fast_div's 64-bit fallback is a subroutine call around which the compiler
// spilled registers (Nsight Compute).
template <typename F>
__device__ __forceinline__ void for_each_tile(const DkGeometry& geo, int tile_h, int tile_w, int small, F f) {
    if (small) {
        for_each_tile_in<int>(geo, tile_h, tile_w, f);
    } else {
        for_each_tile_in<index_t>(geo, tile_h, tile_w, f);
    }
}

// Copies tile d's input window of one channel plane (H x W) into `window`, with its zero border,
// coalesced, in the accumulation type.
template <typename A, typename T>
__device__ __forceinline__ void stage_window(const T* plane, const DirectTile& d, int H, int W, A* window) {
    const T zero = from_acc<T>(A(0));
    walk_copy<T>(
        PlaneWalk(0, d.win_h * d.win_w, d.win_w),
        [&](const PlaneWalk& q) {
            const int iy = d.iy0 + q.y, ix = d.ix0 + q.x;
            return (unsigned)iy < (unsigned)H && (unsigned)ix < (unsigned)W ? plane[iy * W + ix] : zero;
        },
        [&](const PlaneWalk& q, T v) { window[q.p] = to_acc(v); });
}

// The direct convolution, for small Cg * K (depthwise), where a GEMM would have a handful of
// rows. Reading every input tap straight from global memory, with per-position bounds logic,
// made it latency-bound (as slow in fp16 as in fp32, 2.4x cuDNN's depthwise conv2d), so: one
// block per tile of tile_h x tile_w outputs of an (image, output channel) plane samples the
// plane's kernel into shared memory, then, channel by channel, stages the tile's input window
// there with its zero border (when `staged`), loaded once and coalesced, in the accumulation
// type. Each thread computes DK_SPAN outputs of one column, one above the other, with no bounds
// checks: a warp's threads take consecutive columns, so its shared-memory reads hit distinct
// banks and its stores are coalesced. The window covers the tile's rows rounded up to whole
// spans (the extra rows are inputs or border, their sums dropped), so no read leaves it. The
// host sizes the tile (at most blockDim.x columns x spans) and the dynamic shared memory: Cg * K
// kernel values, then the window.
// `transposed`: the backward's input gradient, a convolution of grad_output (stride 1) with the
// resampled kernels flipped, whose channels are transposed within each group: `input` is
// grad_output, `weight` the kernels (N, C_out, Cg, K) of dk_resample, and the geometry that of
// the transposed convolution (channels = C_out, c_out = C_in, padding (k - 1) * dil - pad, the
// outputs the input's H x W); `offset` and the bias are unused. (At N=16, C=256, 56x56,
// depthwise 3x3 on an H200: fp16 74 us, fp32 76 us, where the gather dk_global_input_grad
// took 242 us in both.)
// Every output is bias + the sum over (c, j, i) in this order whatever the tiling, the border's
// zeros included (adding 0 * k to a sum leaves it unchanged, as the CPU's columns do): one
// writer per output, no atomics, bitwise reproducible.
// Launch bounds for 5 blocks of 256 threads per SM, which cap its registers: the occupancy
// this latency-bound kernel needs (fp16 0.123 -> 0.115 ms at N=16, C=256, 56x56, depthwise 3x3
// on an H200, with the 32-bit units; no bound took 0.181 ms, 6 blocks 0.131 ms).
// KH: the kernel's height where the host launches the instantiation compiled for it
// (COMPILED_SIZES; 3 took fp32 0.130 -> 0.109 ms there, and has no spills), else 0.
template <typename T, int KH>
__global__ void __launch_bounds__(256, 5) dk_global_conv(const T* __restrict__ input, const T* __restrict__ weight,
                                                      const T* __restrict__ offset, const T* __restrict__ bias,
                                                      int use_bias, int transposed, int tile_h, int tile_w,
                                                      int staged, int small, DK_GEOMETRY, T* __restrict__ out) {
    typedef typename acc<T>::type A;
    DK_GEO;
    extern __shared__ __align__(16) unsigned char dk_shared[];
    const index_t L = geo.L(), K = geo.K(), cg = geo.cg(), og = geo.og(), hw = geo.hw(), S = geo.scope();
    A* kernel = reinterpret_cast<A*>(dk_shared);
    A* window = kernel + cg * K;
    const int H = (int)height, W = (int)width, OW = (int)out_w;
    // This thread's outputs in a tile: rows ty .. ty + DK_SPAN - 1 of column tx.
    const int span = div32(threadIdx.x, tile_w), tx = (int)threadIdx.x - span * tile_w, ty = span * DK_SPAN;
    auto tile_work = [&](const DirectTile& d) {
        const int wg = div32(d.o, (int)og);
        __syncthreads();  // the previous tile's threads are done with the shared memory
        if (transposed) {
            // Kernel point K-1-k of the forward's (output wg*cg + c, input channel d.o - wg*og).
            const T* kern =
                weight + ((index_t)d.n * channels + wg * cg) * og * K + (index_t)(d.o - wg * og) * K + K - 1;
            for (int r = threadIdx.x; r < (int)(cg * K); r += blockDim.x) {
                const int c = div32(r, (int)K);
                kernel[r] = to_acc(kern[c * og * K - (r - c * (int)K)]);
            }
        } else {
            const T* off = offset + 2 * ((index_t)d.n * offset_groups + div32(d.o, (int)geo.opg())) * K;
            for (int r = threadIdx.x; r < (int)(cg * K); r += blockDim.x) {
                const int c = div32(r, (int)K);
                kernel[r] = geo.resample<A>(weight + ((index_t)d.o * cg + c) * S, off, r - c * (int)K);
            }
        }
        const T* planes = input + ((index_t)d.n * channels + (index_t)wg * cg) * hw;
        const bool mine = ty < d.rows && tx < d.cols;
        A sum[DK_SPAN];
#pragma unroll
        for (int v = 0; v < DK_SPAN; ++v) sum[v] = use_bias ? to_acc(bias[d.o]) : A(0);
        for (index_t c = 0; c < cg; ++c) {
            const T* plane = planes + c * hw;
            if (staged) {
                if (c > 0) __syncthreads();  // the previous channel's window is read
                stage_window(plane, d, H, W, window);
            }
            if (staged || c == 0) __syncthreads();  // the kernel (and the window) are written
            if (!mine) continue;
            const A* kern = kernel + c * K;
            if (staged) {
                span_dot<KH>(StagedWindow<A>{window + ty * sh * d.win_w + tx * sw, d.win_w}, kern, kh, kw, sh, dh, dw,
                             sum);
            } else {
                span_dot<KH>(PlaneWindow<A, T>{plane, d.iy0 + ty * sh, d.ix0 + tx * sw, H, W}, kern, kh, kw, sh, dh,
                             dw, sum);
            }
        }
        if (mine) {
            T* dst = out + d.no * L + (index_t)(d.y0 + ty) * OW + d.x0 + tx;
#pragma unroll
            for (int v = 0; v < DK_SPAN; ++v) {
                if (ty + v < d.rows) dst[v * OW] = from_acc<T>(sum[v]);
            }
        }
    };
    for_each_tile(geo, tile_h, tile_w, small, tile_work);
}

// sum + the sum over the kernel points j in [j_lo, j_hi) of one kernel row whose output column
// x = (left - j * dw) / sw is whole, of row[x] * kernel_row[j]. Pieces of DK_ROW_TAPS unrolled
// points: a loop over a handful of points would spend more on its control than on the
// products. UNIT (sw = 1) has no division.
template <bool UNIT, typename A, typename T>
__device__ __forceinline__ A reaching_dot(const T* row, const T* kernel_row, int left, int dw, int sw, int j_lo,
                                          int j_hi, A sum) {
    for (int j0 = j_lo; j0 < j_hi; j0 += DK_ROW_TAPS) {
#pragma unroll
        for (int t = 0; t < DK_ROW_TAPS; ++t) {
            const int j = j0 + t, tx = left - j * dw;
            if (UNIT) {
                if (j < j_hi) sum += to_acc(row[tx]) * to_acc(kernel_row[j]);
            } else {
                const int x = div32(tx, sw);
                if (j < j_hi && x * sw == tx) sum += to_acc(row[x]) * to_acc(kernel_row[j]);
            }
        }
    }
    return sum;
}

// grad_input[n, c_in, iy, ix] = sum over the outputs o of c_in's weight group and the (i, j, y, x)
// whose rigid point is (iy, ix) of grad_output[n, o, y, x] * kernels[n, o, c, i, j]: the
// transposed direct convolution, a gather. One block per (image, input channel, band of
// positions), one thread per position.
template <typename T>
__global__ void dk_global_input_grad(const T* __restrict__ grad_output, const T* __restrict__ kernels,
                                     index_t bands, DK_GEOMETRY, T* __restrict__ grad_input) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t L = geo.L(), K = geo.K(), hw = geo.hw(), cg = geo.cg(), og = geo.og();
    const int OH = (int)out_h, OW = (int)out_w;
    for (index_t unit = blockIdx.x; unit < batch * channels * bands; unit += gridDim.x) {
        const index_t nc = fast_div(unit, bands), n = fast_div(nc, channels), c_in = nc - n * channels;
        const index_t wg = fast_div(c_in, cg), c = c_in - wg * cg;
        const T* go = grad_output + (n * c_out + wg * og) * L;
        const T* kern = kernels + ((n * c_out + wg * og) * cg + c) * K;  // output wg*og + q: + q*Cg*K
        for (PlaneWalk q = PlaneWalk::band(unit - nc * bands, bands, hw, width); q.live(); q.next()) {
            int i_lo, i_hi, j_lo, j_hi;
            points_reaching(q.y, ph, dh, sh, kh, OH, i_lo, i_hi);
            points_reaching(q.x, pw, dw, sw, kw, OW, j_lo, j_hi);
            const int left = q.x + pw;
            A sum = A(0);
            for (int i = i_lo; i < i_hi; ++i) {
                int y = q.y + ph - i * dh;
                if (sh != 1) {
                    const int t = y;
                    y = div32(t, sh);
                    if (y * sh != t) continue;
                }
                for (index_t o = 0; o < og; ++o) {
                    const T* row = go + o * L + y * OW;
                    const T* kk = kern + o * cg * K + i * kw;
                    sum = sw == 1 ? reaching_dot<true>(row, kk, left, dw, sw, j_lo, j_hi, sum)
                                  : reaching_dot<false>(row, kk, left, dw, sw, j_lo, j_hi, sum);
                }
            }
            grad_input[nc * hw + q.p] = from_acc<T>(sum);
        }
    }
}

// sums[e] += the products of a thread's DK_SPAN grad_output values g[v] (v * sh rows apart)
// with the window's inputs under kernel point e0 + e, for the points of a run that exist.
// KS > 0: the instantiation for a KS x KS kernel at unit row stride and dilation, which the host
// launches only with a staged window (COMPILED_SIZES): the whole kernel is one run, and a kernel
// column's DK_SPAN + KS - 1 inputs are read into registers once for its KS points (as
// span_dot_rows), where the general loop reads DK_SPAN inputs per point.
template <int KS, typename A, typename Window>
__device__ __forceinline__ void point_sums(const Window& win, const A (&g)[DK_SPAN], int e0, const DkGeometry& geo,
                                           A (&sums)[DK_POINT_RUN]) {
    static_assert(KS * KS <= DK_POINT_RUN, "a compiled kernel is one run");
    if (KS > 0) {
#pragma unroll
        for (int j = 0; j < KS; ++j) {
            A taps[DK_SPAN + KS - 1];
#pragma unroll
            for (int v = 0; v < DK_SPAN + KS - 1; ++v) taps[v] = win.at(v, j * geo.dw);
#pragma unroll
            for (int i = 0; i < KS; ++i) {
#pragma unroll
                for (int v = 0; v < DK_SPAN; ++v) sums[i * KS + j] += g[v] * taps[v + i];
            }
        }
        return;
    }
    const int K = geo.kh * geo.kw;
    int i = div32(e0, geo.kw), j = e0 - i * geo.kw;
#pragma unroll
    for (int e = 0; e < DK_POINT_RUN; ++e) {
        if (e0 + e < K) {
#pragma unroll
            for (int v = 0; v < DK_SPAN; ++v) sums[e] += g[v] * win.at(v * geo.sh + i * geo.dh, j * geo.dw);
        }
        if (++j == geo.kw) {
            j = 0;
            ++i;
        }
    }
}

// The resampled kernels' gradient of the direct path, per tile of outputs (dk_global_conv's
// tiles, `bands` of them per plane: the host sizes them the same way):
// grad_kernels[n, t, o, c, k] = the sum over tile t's outputs l of grad_output[n, o, l] *
// input[n, c_in, rigid point of (l, k)]. One block per tile: each thread reads the grad_output
// of its DK_SPAN outputs once; then, channel by channel, the block stages the input window (when
// `staged`) and each thread sums its products for runs of DK_POINT_RUN kernel points, which
// warp_transpose_sums, then the warps in a fixed order, end. The dynamic shared memory holds
// the window alone.
// At N=16, C=256, 56x56 depthwise 3x3 on an H200: fp16 92 us, fp32 84 us (KS = 3, four blocks
// per SM at 64 registers); 119 and 84 us while walk_copy's fp16 loads waited on their
// conversions; 169 and 121 us with that, a warp_sum per point, the general loop and three
// blocks per SM; a block per (n, o, band of positions) reading the input from global memory,
// with bounds checks per point, 169 and 141 us.
template <typename T, int KS>
__global__ void __launch_bounds__(256, 4) dk_global_kernel_grad(const T* __restrict__ grad_output,
                                                                const T* __restrict__ input, int tile_h, int tile_w,
                                                                int staged, int small, DK_GEOMETRY,
                                                                typename acc<T>::type* __restrict__ grad_kernels) {
    typedef typename acc<T>::type A;
    DK_GEO;
    extern __shared__ __align__(16) unsigned char dk_shared[];
    __shared__ A warp_sums[256 / WARP_SIZE][DK_POINT_RUN];
    A* window = reinterpret_cast<A*>(dk_shared);
    const index_t L = geo.L(), K = geo.K(), cg = geo.cg(), hw = geo.hw();
    const int H = (int)height, W = (int)width, OW = (int)out_w;
    const index_t bands = (index_t)ceil_div((int)out_h, tile_h) * ceil_div(OW, tile_w);
    const int span = div32(threadIdx.x, tile_w), tx = (int)threadIdx.x - span * tile_w, ty = span * DK_SPAN;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    // The host launches KS > 0 only with a staged window: known when compiled, so that
    // instantiation has no plane path.
    const bool stage = KS > 0 || staged;
    auto tile_work = [&](const DirectTile& d) {
        const bool mine = ty < d.rows && tx < d.cols;
        const T* go = grad_output + d.no * L + (index_t)(d.y0 + ty) * OW + d.x0 + tx;
        A g[DK_SPAN];
#pragma unroll
        for (int v = 0; v < DK_SPAN; ++v) g[v] = mine && ty + v < d.rows ? to_acc(go[v * OW]) : A(0);
        const T* planes = input + ((index_t)d.n * channels + (index_t)div32(d.o, (int)geo.og()) * cg) * hw;
        A* part = grad_kernels + (((index_t)d.n * bands + d.t) * c_out + d.o) * cg * K;
        for (index_t c = 0; c < cg; ++c) {
            const T* plane = planes + c * hw;
            if (stage) {
                __syncthreads();  // the previous window is read
                stage_window(plane, d, H, W, window);
                __syncthreads();
            }
            for (int e0 = 0; e0 < (int)K; e0 += DK_POINT_RUN) {
                A sums[DK_POINT_RUN];
#pragma unroll
                for (int e = 0; e < DK_POINT_RUN; ++e) sums[e] = A(0);
                if (mine && stage) {
                    point_sums<KS>(StagedWindow<A>{window + ty * sh * d.win_w + tx * sw, d.win_w}, g, e0, geo, sums);
                } else if (mine) {
                    point_sums<0>(PlaneWindow<A, T>{plane, d.iy0 + ty * sh, d.ix0 + tx * sw, H, W}, g, e0, geo,
                                  sums);
                }
                const A total = warp_transpose_sums(sums);  // lane e: the warp's sum of point e0 + e
                __syncthreads();  // the previous run's readers of warp_sums are done
                if (lane < DK_POINT_RUN) warp_sums[warp][lane] = total;
                __syncthreads();
                if (threadIdx.x < DK_POINT_RUN && e0 + (int)threadIdx.x < (int)K) {
                    A sum = A(0);
                    for (int w = 0; w < warps; ++w) sum += warp_sums[w][threadIdx.x];
                    part[c * K + e0 + threadIdx.x] = sum;
                }
            }
        }
    };
    for_each_tile(geo, tile_h, tile_w, small, tile_work);
}

// v[0, count) stored at dst: as one vector where the run is whole and dst aligned to its size
// (scalar stores of fp32 runs, four to a warp's sectors, had made dk_im2col 1.5x slower).
template <typename T>
struct alignas(sizeof(T) * DK_IM2COL_RUN) ImRun {
    T v[DK_IM2COL_RUN];
};

template <typename T>
__device__ __forceinline__ void store_run(T* dst, const ImRun<T>& run, int count) {
    if (count == DK_IM2COL_RUN && reinterpret_cast<size_t>(dst) % sizeof(ImRun<T>) == 0) {
        *reinterpret_cast<ImRun<T>*>(dst) = run;
        return;
    }
#pragma unroll
    for (int u = 0; u < DK_IM2COL_RUN; ++u) {
        if (u < count) dst[u] = run.v[u];
    }
}

// The rows of the columns (each L long) that hold (image, channel) nc's kernel points: kernel
// point k's is first + k * step. dk_im2col's own order is (image, channel, kernel point); with
// `point_major` it is that of the kernel-point-major kernels of dk_mma_operands, (image, weight
// group, kernel point, channel of the group), whose products with the columns are then
// kernel-point-major too.
struct ColumnRows {
    index_t first, step;

    __device__ __forceinline__ ColumnRows(const DkGeometry& geo, index_t nc, int point_major) {
        const index_t K = geo.K(), cg = geo.cg();
        if (point_major) {
            const index_t ng = fast_div(nc, cg);
            first = ng * K * cg + nc - ng * cg;
            step = cg;
        } else {
            first = nc * K;
            step = 1;
        }
    }
};

// dk_im2col for `count` <= DK_IM2COL_RUN consecutive outputs of one row (sw columns apart in
// the plane): kernel point k of output u reads row iy0 + i * dh, column ix0 + u * sw + j * dw
// (zero outside), stored to col[k * L + u]. A point's loads are issued before its stores. I: the
// in-plane coordinates' type.
template <typename I, typename T>
__device__ __forceinline__ void im2col_run(const T* plane, I iy0, I ix0, int count, const DkGeometry& geo,
                                           index_t pitch, T zero, T* col) {
    const I H = (I)geo.height, W = (I)geo.width;
    for (int i = 0; i < geo.kh; ++i) {
        const I iy = iy0 + (I)i * geo.dh;
        const bool row_inside = iy >= 0 && iy < H;
        const T* row = plane + (row_inside ? iy : 0) * W;
        for (int j = 0; j < geo.kw; ++j, col += pitch) {
            const I ix = ix0 + (I)j * geo.dw;
            ImRun<T> run;
#pragma unroll
            for (int u = 0; u < DK_IM2COL_RUN; ++u) {
                const I x = ix + (I)u * geo.sw;
                run.v[u] = row_inside && x >= 0 && x < W ? row[x] : zero;
            }
            store_run(col, run, count);
        }
    }
}

// Columns of the rigid grid for `batch` images: cols[n, c * K + k, l], zero padding. One thread
// per (image, channel, output row, run of DK_IM2COL_RUN outputs of the row), so the index
// arithmetic is shared by a run and a warp writes contiguous stretches of a row; in-plane
// coordinates in 32 bits when every one fits (`small`). At N=16, C=256, 32x32, 3x3 on an H200:
// fp16 35-38 us, fp32 45 us (94 registers had given 40 us in fp16: four blocks an SM now); a
// thread per output took 82 and 88 us, issuing 54 instructions per point (Nsight Compute: 0.77
// instructions a cycle per scheduler, bound by them). Both this and dk_col2im stay bound by
// their instructions: bands of rows staged in shared memory with zero margins, no bounds
// checks, took more (52 and 80 us against 38 and 50 in fp16; branch column-bands).
template <typename T>
__global__ void __launch_bounds__(256, 4) dk_im2col(const T* __restrict__ input, int small, int point_major,
                                                    DK_GEOMETRY, T* __restrict__ cols) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t L = geo.L(), hw = geo.hw(), runs = ceil_div(out_w, (index_t)DK_IM2COL_RUN);
    const T zero = from_acc<T>(A(0));
    CUDEFORM_LOOP(idx, batch * channels * out_h * runs) {
        const index_t row = fast_div(idx, runs), nc = fast_div(row, out_h);
        const index_t y = row - nc * out_h, x = (idx - row * runs) * DK_IM2COL_RUN;
        const int count = (int)min((index_t)DK_IM2COL_RUN, out_w - x);
        const T* plane = input + nc * hw;
        const ColumnRows rows(geo, nc, point_major);
        T* col = cols + rows.first * L + y * out_w + x;
        if (small) {
            im2col_run<int>(plane, (int)y * sh - ph, (int)x * sw - pw, count, geo, rows.step * L, zero, col);
        } else {
            im2col_run<index_t>(plane, geo.in_row(y, 0), geo.in_col(x, 0), count, geo, rows.step * L, zero, col);
        }
    }
}

// The sum, in a fixed order, of the column gradients that input pixel (iy, ix) of a plane fed,
// whose columns start at `col`, a kernel point's every `pitch` elements: DK_IM2COL_PIECE kernel
// points' loads issued (zero where the point reaches no output) before any is added. I: the
// in-plane coordinates' type.
template <typename A, typename I, typename T>
__device__ __forceinline__ A col2im_sum(const T* col, I iy, I ix, const DkGeometry& geo, index_t pitch, T zero) {
    const int K = geo.kh * geo.kw;
    A sum = A(0);
    for (int k0 = 0; k0 < K; k0 += DK_IM2COL_PIECE) {
        int i = k0 / geo.kw, j = k0 - i * geo.kw;
        const T* row = col + k0 * pitch;
        T v[DK_IM2COL_PIECE];
#pragma unroll
        for (int t = 0; t < DK_IM2COL_PIECE; ++t, row += pitch) {
            I y = 0, x = 0;
            const bool hit = k0 + t < K && geo.out_row(iy, i, y) && geo.out_col(ix, j, x);
            v[t] = hit ? row[y * (I)geo.out_w + x] : zero;
            if (++j == geo.kw) {
                j = 0;
                ++i;
            }
        }
#pragma unroll
        for (int t = 0; t < DK_IM2COL_PIECE; ++t) sum += to_acc(v[t]);
    }
    return sum;
}

// col2im_sum for DK_IM2COL_RUN pixels of one row, (iy, ix + u), at unit stride in 32-bit
// coordinates: a kernel point's row check and address are shared by the run, whose loads are
// contiguous. The same sums in the same order as col2im_sum's.
template <typename A, typename T>
__device__ __forceinline__ void col2im_run(const T* col, int iy, int ix, const DkGeometry& geo, index_t pitch, T zero,
                                           A (&sum)[DK_IM2COL_RUN]) {
    const int OH = (int)geo.out_h, OW = (int)geo.out_w;
    for (int i = 0; i < geo.kh; ++i, col += geo.kw * pitch) {
        const int y = iy + geo.ph - i * geo.dh;
        if (y < 0 || y >= OH) continue;
        const T* row = col + y * OW;
        for (int j = 0; j < geo.kw; ++j) {
            const int x0 = ix + geo.pw - j * geo.dw;
            T v[DK_IM2COL_RUN];
#pragma unroll
            for (int u = 0; u < DK_IM2COL_RUN; ++u) {
                const int x = x0 + u;
                v[u] = x >= 0 && x < OW ? row[j * pitch + x] : zero;
            }
#pragma unroll
            for (int u = 0; u < DK_IM2COL_RUN; ++u) sum[u] += to_acc(v[u]);
        }
    }
}

// The input gradient from the columns' gradient: a gather, one thread per (image, channel, row,
// run of DK_IM2COL_RUN pixels of the row). At unit stride with 32-bit in-plane coordinates
// (`small`) the run shares its index arithmetic (col2im_run), else each pixel is col2im_sum's.
// At N=16, C=256, 32x32, 3x3 on an H200: fp16 47 us, fp32 56 us. A thread per pixel took (fp16)
// 88 us with unit stride compiled apart, 113 us where the compiler computed a division per
// point and axis whatever the stride, 133 us with each load waiting for the one before, 231 us
// all in 64 bits. The columns' rows in either order (ColumnRows).
template <typename T>
__global__ void dk_col2im(const T* __restrict__ cols, int small, int point_major, DK_GEOMETRY,
                          T* __restrict__ grad_input) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t L = geo.L(), hw = geo.hw(), runs = ceil_div(width, (index_t)DK_IM2COL_RUN);
    const T zero = from_acc<T>(A(0));
    const bool unit = sh == 1 && sw == 1;
    CUDEFORM_LOOP(idx, batch * channels * height * runs) {
        const index_t row = fast_div(idx, runs), nc = fast_div(row, height);
        const index_t iy = row - nc * height, ix = (idx - row * runs) * DK_IM2COL_RUN;
        const int count = (int)min((index_t)DK_IM2COL_RUN, width - ix);
        const ColumnRows rows(geo, nc, point_major);
        const T* col = cols + rows.first * L;
        const index_t pitch = rows.step * L;
        A sum[DK_IM2COL_RUN];
#pragma unroll
        for (int u = 0; u < DK_IM2COL_RUN; ++u) sum[u] = A(0);
        if (small && unit) {
            col2im_run(col, (int)iy, (int)ix, geo, pitch, zero, sum);
        } else {
#pragma unroll
            for (int u = 0; u < DK_IM2COL_RUN; ++u) {
                if (u >= count) break;
                sum[u] = small ? col2im_sum<A>(col, (int)iy, (int)ix + u, geo, pitch, zero)
                               : col2im_sum<A>(col, iy, ix + u, geo, pitch, zero);
            }
        }
        ImRun<T> run;
#pragma unroll
        for (int u = 0; u < DK_IM2COL_RUN; ++u) run.v[u] = from_acc<T>(sum[u]);
        store_run(grad_input + nc * hw + iy * width + ix, run, count);
    }
}

// Where kernel point k of one (image, offset group) samples the scope run [s0, s0 + run)
// (dk_resample's bilinear_zero; its slopes as BilinearSlopes), for the columns of
// dk_global_resample_grad (a run entry every `step` elements, run DK_SCOPE_RUN), the taps of
// dk_resample_grad_sums (step 1) or dk_resample_grad_offsets (the whole scope): per corner
// c = dy * 2 + dx, its entry's offset `at`, its weight `tap` (zero outside the open box) and its
// weight's slopes by (dh, dw) (zero outside [-1, S_h) x [-1, S_w)); a corner outside the run has
// offset 0 and no weight or slopes, so that the caller needs no branch. The same for every
// (o, c) of the offset group: built once per block.
template <typename A>
struct __align__(16) ScopeCorners {
    int at[4];
    A tap[4], d_h[4], d_w[4];

    ScopeCorners() = default;  // for the shared array
    template <typename T>
    __device__ __forceinline__ ScopeCorners(const DkGeometry& geo, const T* off, int k, index_t s0, int step,
                                            index_t run = DK_SCOPE_RUN) {
        A h, w;
        geo.scope_point(k / geo.kw, k % geo.kw, off + 2 * k, 1, h, w);
        const bool live = h >= A(-1) && h < A(geo.scope_h) && w >= A(-1) && w < A(geo.scope_w);
        // The open box lies in [-1, S_h) x [-1, S_w), where the corners are the same.
        const bool inside = in_open_box(h, w, geo.scope_h, geo.scope_w);
        const Corners<A> p(live ? h : A(0), live ? w : A(0));  // keeps NaN out of the casts
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int dy = c / 2, dx = c % 2;
            const index_t y = p.y0 + dy, x = p.x0 + dx, s = y * geo.scope_w + x - s0;
            const bool in_run = live && y >= 0 && y < geo.scope_h && x >= 0 && x < geo.scope_w && s >= 0 &&
                                s < run;
            const A ly = dy ? p.lh : A(1) - p.lh, lx = dx ? p.lw : A(1) - p.lw;
            at[c] = in_run ? (int)s * step : 0;
            tap[c] = in_run && inside ? ly * lx : A(0);
            d_h[c] = in_run ? (dy ? lx : -lx) : A(0);
            d_w[c] = in_run ? (dx ? ly : -ly) : A(0);
        }
    }
};

// Pass 1 of the backward through global DK's resampling, both of its gradients in one pass over
// grad_kernels (N, bands, C_out, Cg, K) (summed over the bands):
//   weight_partial[chunk, o, c, s] = the sum over the images n of image chunk `chunk`, and over
//     k, of grad_kernels[n, o, c, k] * (the weight of scope element s in kernel point k of
//     (n, g));
//   offset_partial[pair block * runs + run, n, g, k, {0, 1}] = the sum over the (o, c) pairs of
//     that block of offset group g, and over the corners in that run of scope elements, of
//     grad_kernels[n, o, c, k] * weight[o, c, s] * (the slope of the corner's weight).
// sum_partials over the chunks gives grad_weight and grad_offset. One block per (offset group,
// block of pairs, chunk of images), one thread per pair, for runs of DK_SCOPE_RUN scope elements:
// a thread's scope values and weight-gradient sums are its own column of shared memory, the
// corners (ScopeCorners, the block's for DK_POINT_GROUP kernel points at a time) are four
// entries of it, and the offsets' sums over pairs are warp_transpose_sums, then the warps' in a
// fixed order. (At N=16, C=256, 32x32, groups=1 in fp16 on an H200 this kernel takes 83 us at
// three blocks per SM (80 registers), 88 us at two, when Nsight Compute counted 0.37
// instructions issued a cycle per scheduler: latency-bound. A pass over
// every (n, o, c, k, s) with tables of the 16 scope weights and slopes in shared memory took
// 151 us, bound by their delivery; a warp per kernel point reading each pair's scope corners,
// 108 us, plus a thread per pair reading the weights from global memory, 84 us, both bound by
// L1 loads.) Dynamic shared memory: 2 * DK_SCOPE_RUN accumulators per thread, at most 256
// threads.
template <typename T>
__global__ void __launch_bounds__(256, 3) dk_global_resample_grad(
    const typename acc<T>::type* __restrict__ grad_kernels, const T* __restrict__ weight, const T* __restrict__ offset,
    index_t bands, index_t pair_blocks, index_t image_chunks, DK_GEOMETRY,
    typename acc<T>::type* __restrict__ offset_partial, typename acc<T>::type* __restrict__ weight_partial) {
    typedef typename acc<T>::type A;
    DK_GEO;
    extern __shared__ __align__(16) unsigned char dk_shared[];
    A* const scope = reinterpret_cast<A*>(dk_shared) + threadIdx.x;  // column: scope[e * blockDim.x]
    A* const sums = scope + DK_SCOPE_RUN * blockDim.x;
    __shared__ ScopeCorners<A> points[DK_POINT_GROUP];
    __shared__ A warp_sums[256 / WARP_SIZE][WARP_SIZE];
    const index_t K = geo.K(), S = geo.scope(), occ = c_out * geo.cg(), terms = geo.opg() * geo.cg();
    const index_t per = ceil_div(batch, image_chunks), runs = ceil_div(S, (index_t)DK_SCOPE_RUN);
    const index_t ngk = batch * offset_groups * K;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    const int step = (int)blockDim.x;  // between a column's entries
    for (index_t unit = blockIdx.x; unit < offset_groups * pair_blocks * image_chunks; unit += gridDim.x) {
        const index_t gp = fast_div(unit, image_chunks), chunk = unit - gp * image_chunks;
        const index_t g = fast_div(gp, pair_blocks), pair_block = gp - g * pair_blocks;
        const index_t t = pair_block * blockDim.x + threadIdx.x;
        const bool live = t < terms;
        const index_t oc = g * terms + (live ? t : 0);  // the (o, c) of offset group g are contiguous
        const index_t n_end = min(batch, (chunk + 1) * per);
        for (index_t run = 0; run < runs; ++run) {
            const index_t s0 = run * DK_SCOPE_RUN;
#pragma unroll
            for (int e = 0; e < DK_SCOPE_RUN; ++e) {
                scope[e * step] = live && s0 + e < S ? to_acc(weight[oc * S + s0 + e]) : A(0);
                sums[e * step] = A(0);
            }
            for (index_t n = chunk * per; n < n_end; ++n) {
                const T* off = offset + 2 * (n * offset_groups + g) * K;
                const A* gk = grad_kernels + (n * bands * occ + oc) * K;
                for (index_t k0 = 0; k0 < K; k0 += DK_POINT_GROUP) {
                    const int count = (int)min((index_t)DK_POINT_GROUP, K - k0);
                    __syncthreads();  // the previous group's readers of points and warp_sums are done
                    if (threadIdx.x < count) {
                        points[threadIdx.x] = ScopeCorners<A>(geo, off, (int)k0 + threadIdx.x, s0, step);
                    }
                    // The group's loads all in flight at once, band by band.
                    A grads[DK_POINT_GROUP];
#pragma unroll
                    for (int q = 0; q < DK_POINT_GROUP; ++q) grads[q] = live && q < count ? gk[k0 + q] : A(0);
#pragma unroll 1
                    for (index_t band = 1; band < bands; ++band) {
#pragma unroll
                        for (int q = 0; q < DK_POINT_GROUP; ++q) {
                            if (live && q < count) grads[q] += gk[band * occ * K + k0 + q];
                        }
                    }
                    __syncthreads();
                    // Half a group at a time: 8 points' two slopes are one warp_transpose_sums.
#pragma unroll
                    for (int half = 0; half < DK_POINT_GROUP; half += DK_POINT_GROUP / 2) {
                        if (half >= count) break;
                        A slopes[DK_POINT_GROUP];
#pragma unroll
                        for (int u = 0; u < DK_POINT_GROUP / 2; ++u) {
                            const int q = half + u;
                            A d_h = A(0), d_w = A(0);
                            if (q < count) {
                                const ScopeCorners<A> p = points[q];
#pragma unroll
                                for (int c = 0; c < 4; ++c) {
                                    const A v = scope[p.at[c]];
                                    d_h += p.d_h[c] * v;
                                    d_w += p.d_w[c] * v;
                                    sums[p.at[c]] += grads[q] * p.tap[c];
                                }
                            }
                            slopes[2 * u] = grads[q] * d_h;
                            slopes[2 * u + 1] = grads[q] * d_w;
                        }
                        const A total = warp_transpose_sums(slopes);
                        if (lane < DK_POINT_GROUP) warp_sums[warp][2 * half + lane] = total;
                    }
                    __syncthreads();
                    for (int i = threadIdx.x; i < 2 * count; i += blockDim.x) {
                        A total = A(0);
                        for (int v = 0; v < warps; ++v) total += warp_sums[v][i];
                        const index_t b = (n * offset_groups + g) * K + k0 + i / 2;
                        offset_partial[2 * ((pair_block * runs + run) * ngk + b) + i % 2] = total;
                    }
                }
            }
            if (live) {
                A* dst = weight_partial + (chunk * occ + oc) * S + s0;
#pragma unroll
                for (int e = 0; e < DK_SCOPE_RUN; ++e) {
                    if (s0 + e < S) dst[e] = sums[e * step];
                }
            }
        }
    }
}

// taps[g, (n, k), s] for dk_resample_grad_sums: the weight of scope element s in kernel point k
// of (n, g) (ScopeCorners' four corners, zero elsewhere), rounded to TF32 (the operand its MMAs
// take), rows of S rounded up to DK_SCOPE_RUN. A thread per (g, (n, k)) of blocks first,
// first + step, ...
template <typename T>
__device__ void scope_taps(const T* __restrict__ offset, const DkGeometry& geo, float* __restrict__ taps,
                           index_t first, index_t step) {
    const index_t K = geo.K(), S = geo.scope(), R = geo.batch * K;
    const index_t pitch = ceil_div(S, (index_t)DK_SCOPE_RUN) * DK_SCOPE_RUN;
    for (index_t i = first * blockDim.x + threadIdx.x; i < geo.offset_groups * R; i += step * blockDim.x) {
        const index_t g = fast_div(i, R), r = i - g * R, n = fast_div(r, K);
        const ScopeCorners<float> p(geo, offset + 2 * (n * geo.offset_groups + g) * K, (int)(r - n * K), 0, 1, S);
        for (index_t s = 0; s < pitch; ++s) {
            float v = 0.0f;
#pragma unroll
            for (int c = 0; c < 4; ++c) v += p.at[c] == s ? p.tap[c] : 0.0f;  // a corner outside has tap 0
            taps[i * pitch + s] = __uint_as_float(to_tf32(v));
        }
    }
}

// The backward through the resampling from the kernels' gradient of the kernel-point-major
// columns path, (N, C_out, K, Cg) in float32: a matrix of rows (n, k) and columns (o, c),
// element ((n, k), (o, c)) at ((n * C_out + o) * K + k) * Cg + c. Per offset group g, over its
// (o, c) columns and per scope element s:
//   grad_weight[(o, c), s] = sum over rows (n, k) of grad_kernels[(n, k), (o, c)] * taps[g, (n, k), s],
//   products[g, (n, k), s] = sum over (o, c) of grad_kernels[(n, k), (o, c)] * weight[(o, c), s],
// taps from scope_taps. grad_offset follows from the products (dk_resample_grad_offsets).
// Both are thin matrix products over one pass of grad_kernels, run on tensor cores in TF32
// (grad_kernels was summed in float32 from operands of the half type, which carry no more bits
// than TF32; the weight's half values pass exactly): a block per (offset group, chunk of
// DK_SUM_COLUMNS columns, run of DK_SCOPE_RUN scope elements), a warp per 32 of its columns,
// over stages of dk_sums::ROWS rows that cp.async copies into shared memory two stages ahead,
// with their taps. A warp's tile of a stage is only its own columns: the weight gradient (its
// columns x the stage's taps) accumulates in its registers over every row and is stored once,
// as T; the products (the stage's rows x its columns' weights, MMA operands kept in registers)
// replace the warp's tile and are summed over the warps into product_partial[g, chunk, (n, k),
// s]. Needs Cg % 4 == 0 (the tensor-core path's Cg % 8): 4 columns are one 16-byte copy.
// At N=16, C=256, 32x32 in fp16 on an H200: 28 us (Nsight Compute: 0.5 instructions issued a
// cycle per scheduler, DRAM at 28% of its peak; one stage in flight, 29 us), where a thread per
// column on the CUDA cores, its products a 16 x 16 product per row group in shared memory, took
// 64, latency-bound.
#define DK_SUM_COLUMNS 256
namespace dk_sums {
constexpr int WARPS = DK_SUM_COLUMNS / WARP_SIZE;
constexpr int ROWS = 32;                         // rows of a stage
constexpr int STAGES = 3;                        // two in flight while the tensor cores take the third
constexpr int TILE = ROWS * WARP_SIZE;           // floats of a warp's part of a stage
constexpr int STAGE = WARPS * TILE;
constexpr int PITCH = DK_SCOPE_RUN + 8;          // rows of taps and products: fragment reads in distinct banks
constexpr int SHARED_BYTES = STAGES * (STAGE + ROWS * PITCH) * 4;  // SUM_SHARED_BYTES in the host
static_assert(DK_SCOPE_RUN == 16 && ROWS == 32, "two 8-column tiles of scope elements, two 16-row tiles of rows");
static_assert(ROWS * DK_SCOPE_RUN / 4 <= DK_SUM_COLUMNS, "a thread copies at most one vector of a stage's taps");
static_assert(ROWS * PITCH <= TILE, "a warp's products fit its tile");
static_assert(SHARED_BYTES <= 113 * 1024, "two blocks fit an SM");

// Element (r, c) of a warp's tile lies at r * 32 + (c ^ swizzle(r)), so that both fragment
// reads, (row, column) = (group, lane in group) for the products and (lane in group, group) for
// the weight gradient, fall in 32 distinct banks; 4 columns from a multiple of 4 stay together.
__device__ __forceinline__ int swizzle(int r) { return (r & 3) * 8 + (r & 4); }
}  // namespace dk_sums

template <typename T>
__global__ void __launch_bounds__(DK_SUM_COLUMNS, 2) dk_resample_grad_sums(
    const float* __restrict__ grad_kernels, const T* __restrict__ weight, const float* __restrict__ tap_table,
    DK_GEOMETRY, float* __restrict__ product_partial, T* __restrict__ grad_weight) {
    using namespace dk_sums;
    DK_GEO;
    extern __shared__ __align__(16) unsigned char dk_shared[];
    float* const stages = reinterpret_cast<float*>(dk_shared);  // [STAGES][WARPS][ROWS][32]
    float* const taps = stages + STAGES * STAGE;                  // [STAGES][ROWS][PITCH]
    const index_t K = geo.K(), S = geo.scope(), R = batch * K, cg = geo.cg(), image = c_out * K * cg;
    const index_t pairs = geo.opg() * cg, taps_pitch = ceil_div(S, (index_t)DK_SCOPE_RUN) * DK_SCOPE_RUN;
    const index_t chunks = ceil_div(pairs, (index_t)DK_SUM_COLUMNS), runs = taps_pitch / DK_SCOPE_RUN;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, group = lane / 4, in_group = lane % 4;
    const int base = warp * WARP_SIZE;  // the warp's first column in the chunk
    // The copies: a lane takes 4 columns (quad) of every 4th row of a stage, from row `lead`.
    const int lead = lane / 8, quad = lane % 8;
    for (index_t unit = blockIdx.x; unit < offset_groups * chunks * runs; unit += gridDim.x) {
        const index_t gc = fast_div(unit, runs), g = fast_div(gc, chunks), s0 = (unit - gc * runs) * DK_SCOPE_RUN;
        const index_t first = g * pairs + (gc - g * chunks) * DK_SUM_COLUMNS;  // the chunk's first column
        const int columns = (int)min((index_t)DK_SUM_COLUMNS, (g + 1) * pairs - first);
        const int elements = (int)min((index_t)DK_SCOPE_RUN, S - s0);
        // The weights as the products' B operand: [step of 8 columns][8 scope elements][k row].
        unsigned w[4][2][2];
#pragma unroll
        for (int step = 0; step < 4; ++step) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int c = base + 8 * step + in_group + 4 * h, e = 8 * half + group;
                    w[step][half][h] =
                        c < columns && e < elements ? to_tf32(to_acc(weight[(first + c) * S + s0 + e])) : 0u;
                }
            }
        }
        const bool live = base + 4 * quad < columns;
        const index_t o = fast_div(first + base + 4 * quad, cg);
        // This lane's next row of grad_kernels, n * K + k, its columns at `from`. 4 rows on, n
        // grows by 4 / K and k by 4 % K, and by one more image where k passes K.
        int k = lead % (int)K;  // K * Cg < 2^31 on the tensor-core path
        const float* from = grad_kernels + o * K * cg + first + base + 4 * quad - o * cg + lead / K * image + k * cg;
        const int k_step = (int)(4 % K);
        const index_t jump = 4 / K * image + k_step * cg, wrap = image - K * cg;
        const float* const tap_rows = tap_table + g * R * taps_pitch + s0;
        auto copy_stage = [&](index_t r0, int buffer) {
            float* const tile = stages + buffer * STAGE + warp * TILE;
#pragma unroll
            for (int i = 0; i < ROWS / 4; ++i) {
                const int row = 4 * i + lead;
                copy_async_16(tile + row * WARP_SIZE + ((4 * quad) ^ swizzle(row)), from, live && r0 + row < R);
                from += jump;
                k += k_step;
                if (k >= (int)K) k -= (int)K, from += wrap;
            }
            if (threadIdx.x < ROWS * DK_SCOPE_RUN / 4) {
                const int row = threadIdx.x / 4, e = threadIdx.x % 4 * 4;
                copy_async_16(taps + (buffer * ROWS + row) * PITCH + e, tap_rows + (r0 + row) * taps_pitch + e,
                              r0 + row < R);
            }
            copy_async_commit();
        };
        float grad[2][2][4] = {};  // [16 columns][8 scope elements][fragment]
        copy_stage(0, 0);
        if (ROWS < R) copy_stage(ROWS, 1);
        for (index_t r0 = 0; r0 < R; r0 += ROWS) {
            const int buffer = (int)(r0 / ROWS % STAGES);
            if (r0 + ROWS < R) {
                copy_async_wait<1>();
            } else {
                copy_async_wait<0>();
            }
            // The stage's copies are visible to every warp, and the buffer two stages on is free
            // (the last readers of the stage before this one are done).
            __syncthreads();
            if (r0 + 2 * ROWS < R) copy_stage(r0 + 2 * ROWS, (buffer + 2) % STAGES);
            float* const tile = stages + buffer * STAGE + warp * TILE;
            auto at = [&](int row, int c) { return to_tf32(tile[row * WARP_SIZE + (c ^ swizzle(row))]); };
            float sums[2][2][4] = {};  // products: [16 rows][8 scope elements][fragment]
#pragma unroll
            for (int step = 0; step < 4; ++step) {
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    const int row = 16 * m + group, c = 8 * step + in_group;
                    const unsigned a[4] = {at(row, c), at(row + 8, c), at(row, c + 4), at(row + 8, c + 4)};
#pragma unroll
                    for (int half = 0; half < 2; ++half) mma_tf32(sums[m][half], a, w[step][half]);
                }
            }
            const float* const tap = taps + buffer * ROWS * PITCH;
#pragma unroll
            for (int step = 0; step < 4; ++step) {
                const int row = 8 * step + in_group;
                unsigned b[2][2];
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    b[half][0] = __float_as_uint(tap[row * PITCH + 8 * half + group]);
                    b[half][1] = __float_as_uint(tap[(row + 4) * PITCH + 8 * half + group]);
                }
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    const int c = 16 * m + group;
                    const unsigned a[4] = {at(row, c), at(row, c + 8), at(row + 4, c), at(row + 4, c + 8)};
#pragma unroll
                    for (int half = 0; half < 2; ++half) mma_tf32(grad[m][half], a, b[half]);
                }
            }
            // The warp's products replace its tile, which it has read.
            __syncwarp();
#pragma unroll
            for (int m = 0; m < 2; ++m) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int row = 16 * m + group, e = 8 * half + 2 * in_group;
                    const float* const f = sums[m][half];
                    *reinterpret_cast<float2*>(&tile[row * PITCH + e]) = make_float2(f[0], f[1]);
                    *reinterpret_cast<float2*>(&tile[(row + 8) * PITCH + e]) = make_float2(f[2], f[3]);
                }
            }
            __syncthreads();
            const float* const products = stages + buffer * STAGE;
            for (int i = threadIdx.x; i < ROWS * DK_SCOPE_RUN; i += blockDim.x) {
                const int row = i / DK_SCOPE_RUN, e = i % DK_SCOPE_RUN;
                float total = 0.0f;
#pragma unroll
                for (int v = 0; v < WARPS; ++v) total += products[v * TILE + row * PITCH + e];
                if (r0 + row < R && e < elements) product_partial[(gc * R + r0 + row) * S + s0 + e] = total;
            }
        }
#pragma unroll
        for (int m = 0; m < 2; ++m) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
#pragma unroll
                for (int f = 0; f < 4; ++f) {
                    const int c = base + 16 * m + group + 8 * (f / 2), e = 8 * half + 2 * in_group + f % 2;
                    if (c < columns && e < elements) {
                        grad_weight[(first + c) * S + s0 + e] = from_acc<T>(grad[m][half][f]);
                    }
                }
            }
        }
    }
}

// grad_offset[n, g, k, {0, 1}] = the sum over the corners of kernel point k of (n, g) of the
// corner's slopes times the products at its scope element: dk_global_resample_grad's sum over
// (o, c) of grad_kernels times the scope's slopes. A block per (offset group, n, k): its threads
// sum the chunks' partial products of the four corners in a fixed order (block_sums).
template <typename T>
__global__ void __launch_bounds__(256) dk_resample_grad_offsets(const float* __restrict__ product_partial,
                                                                const T* __restrict__ offset, DK_GEOMETRY,
                                                                T* __restrict__ grad_offset) {
    DK_GEO;
    __shared__ float scratch[4 * WARP_SIZE];
    const index_t K = geo.K(), S = geo.scope(), R = batch * K;
    const index_t chunks = ceil_div(geo.opg() * geo.cg(), (index_t)DK_SUM_COLUMNS);
    for (index_t unit = blockIdx.x; unit < offset_groups * R; unit += gridDim.x) {
        const index_t g = fast_div(unit, R), r = unit - g * R, n = fast_div(r, K), k = r - n * K;
        const index_t point = (n * offset_groups + g) * K;
        const ScopeCorners<float> p(geo, offset + 2 * point, (int)k, 0, 1, S);
        float m[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (index_t c = threadIdx.x; c < chunks; c += blockDim.x) {
            const float* const row = product_partial + ((g * chunks + c) * R + r) * S;
#pragma unroll
            for (int u = 0; u < 4; ++u) m[u] += row[p.at[u]];
        }
        block_sums(m, scratch);
        if (threadIdx.x == 0) {
            float d_h = 0.0f, d_w = 0.0f;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                d_h += p.d_h[u] * m[u];
                d_w += p.d_w[u] * m[u];
            }
            grad_offset[2 * (point + k)] = from_acc<T>(d_h);
            grad_offset[2 * (point + k) + 1] = from_acc<T>(d_w);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Local DK
// ---------------------------------------------------------------------------------------------

// The work of the local forward and input-gradient kernels: one thread per position of a block
// of positions, for a chunk of up to DK_CHUNK channels, the chunk fastest (consecutive blocks
// share the image, the positions and their offsets). The channels are `runs` runs of `run`
// channels, each cut into chunks of `span`: chunk m of a run covers channels
// [m * span, min(run, (m + 1) * span)) of it.
struct DkLocalWork {
    index_t positions, run, per_run, chunks, blocks, units;
    int span;

    __device__ __forceinline__ DkLocalWork(index_t positions, index_t batch, index_t runs, index_t run, int span)
        : positions(positions), run(run), per_run(ceil_div(run, (index_t)span)), chunks(runs * per_run),
          blocks(ceil_div(positions, (index_t)blockDim.x)), units(batch * blocks * chunks), span(span) {}

    // Unit `unit`: image n, this thread's position p (live: inside the plane), and the chunk's
    // first channel and channel count.
    __device__ __forceinline__ void item(index_t unit, index_t& n, index_t& p, bool& live, index_t& first,
                                         int& count) const {
        const index_t nb = fast_div(unit, chunks), chunk = unit - nb * chunks, r = fast_div(chunk, per_run);
        n = fast_div(nb, blocks);
        p = (nb - n * blocks) * blockDim.x + threadIdx.x;
        live = p < positions;
        first = r * run + (chunk - r * per_run) * span;
        count = (int)min((index_t)span, (r + 1) * run - first);
    }
};

// out[n, o, l] = bias[o] + sum over c, (i, j) of input[n, c_in, rigid point] * the scope of (o, c)
// sampled at (i, j) moved by the offsets of (n, l). The chunk's output channels lie in one offset
// group: the taps of a kernel point are computed once for all of them.
template <typename T>
__global__ void __launch_bounds__(256, 2) dk_local_conv(const T* __restrict__ input, const T* __restrict__ weight,
                                                     const T* __restrict__ offset, const T* __restrict__ bias,
                                                     int use_bias, int span, DK_GEOMETRY, T* __restrict__ out) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t L = geo.L(), K = geo.K(), hw = geo.hw(), S = geo.scope(), cg = geo.cg(), og = geo.og();
    const DkLocalWork work(L, batch, offset_groups, geo.opg(), span);
    for (index_t unit = blockIdx.x; unit < work.units; unit += gridDim.x) {
        index_t n, l, o0;
        bool live;
        int count;
        work.item(unit, n, l, live, o0, count);
        if (!live) continue;
        const index_t g = fast_div(o0, geo.opg());
        const index_t y = fast_div(l, out_w), x = l - y * out_w;
        // Each channel's first input plane and its scopes. Lanes past the chunk's end repeat its
        // last channel: every address below is valid without a test, and their sums are dropped.
        const T* planes[DK_CHUNK];
        const T* scopes[DK_CHUNK];
        A sums[DK_CHUNK];
        index_t wg = fast_div(o0, og), within = o0 - wg * og;
#pragma unroll
        for (int u = 0; u < DK_CHUNK; ++u) {
            const index_t o = o0 + min(u, count - 1);
            planes[u] = input + (n * channels + wg * cg) * hw;
            scopes[u] = weight + o * cg * S;
            sums[u] = use_bias ? to_acc(bias[o]) : A(0);
            if (u + 1 < count && ++within == og) {
                within = 0;
                ++wg;
            }
        }
        const T* off = offset + (n * offset_groups + g) * K * 2 * L + l;
        geo.for_each_local_tap<A>(y, x, off, L, [&](index_t pixel, A h, A w) {
            const BilinearTaps<A> taps(h, w, scope_h, scope_w);
            for (index_t c = 0; c < cg; ++c, pixel += hw) {
#pragma unroll
                for (int u = 0; u < DK_CHUNK; ++u) sums[u] += to_acc(planes[u][pixel]) * taps.sample(scopes[u] + c * S);
            }
        });
#pragma unroll
        for (int u = 0; u < DK_CHUNK; ++u) {
            if (u < count) out[(n * c_out + o0 + u) * L + l] = from_acc<T>(sums[u]);
        }
    }
}

// grad_input[n, c_in, iy, ix] = sum over the outputs o of c_in's weight group and the (i, j, y, x)
// whose rigid point is (iy, ix) of grad_output[n, o, y, x] * the scope of (o, c) sampled at (i, j)
// moved by the offsets of (n, y, x). A gather. The host cuts the input channels into chunks
// whose outputs o = weight group * og + q lie, for every q, in one offset group (a chunk inside
// one weight group, or of depthwise channels whose outputs share an offset group), so the taps
// of a kernel point are computed once per run of outputs for the whole chunk.
template <typename T>
__global__ void __launch_bounds__(256, 2) dk_local_input_grad(const T* __restrict__ grad_output,
                                                           const T* __restrict__ weight, const T* __restrict__ offset,
                                                           int span, index_t run, DK_GEOMETRY,
                                                           T* __restrict__ grad_input) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t L = geo.L(), K = geo.K(), hw = geo.hw(), S = geo.scope(), cg = geo.cg(), og = geo.og();
    const index_t opg = geo.opg();
    const DkLocalWork work(hw, batch, fast_div(channels, run), run, span);
    for (index_t unit = blockIdx.x; unit < work.units; unit += gridDim.x) {
        index_t n, p, c0;
        bool live;
        int count;
        work.item(unit, n, p, live, c0, count);
        if (!live) continue;
        const index_t iy = fast_div(p, width), ix = p - iy * width;
        // Per input channel, the grad_output plane of the first output of its weight group and
        // the scope of (that output, the channel). Lanes past the chunk's end repeat its last
        // channel, as in dk_local_conv.
        const T* outs[DK_CHUNK];
        const T* scopes[DK_CHUNK];
        A sums[DK_CHUNK];
        const index_t wg0 = fast_div(c0, cg);
        index_t wg = wg0, c = c0 - wg * cg;
#pragma unroll
        for (int u = 0; u < DK_CHUNK; ++u) {
            outs[u] = grad_output + (n * c_out + wg * og) * L;
            scopes[u] = weight + (wg * og * cg + c) * S;
            sums[u] = A(0);
            if (u + 1 < count && ++c == cg) {
                c = 0;
                ++wg;
            }
        }
        for (int i = 0; i < kh; ++i) {
            index_t y;
            if (!geo.out_row(iy, i, y)) continue;
            for (int j = 0; j < kw; ++j) {
                index_t x;
                if (!geo.out_col(ix, j, x)) continue;
                const index_t l = y * out_w + x, k = (index_t)i * kw + j;
                // Outputs wg*og + q, in runs of q that share an offset group.
                for (index_t q = 0; q < og;) {
                    const index_t g = fast_div(wg0 * og + q, opg), q_end = min(og, (g + 1) * opg - wg0 * og);
                    A h, w;
                    geo.scope_point(i, j, offset + ((n * offset_groups + g) * K + k) * 2 * L + l, L, h, w);
                    if (in_open_box(h, w, scope_h, scope_w)) {
                        const BilinearTaps<A> taps(h, w, scope_h, scope_w);
                        for (; q < q_end; ++q) {
#pragma unroll
                            for (int u = 0; u < DK_CHUNK; ++u)
                                sums[u] += to_acc(outs[u][q * L + l]) * taps.sample(scopes[u] + q * cg * S);
                        }
                    }
                    q = q_end;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < DK_CHUNK; ++u) {
            if (u < count) grad_input[(n * channels + c0 + u) * hw + p] = from_acc<T>(sums[u]);
        }
    }
}

// grad_offset[n, 2 * (g*K + k) + {0, 1}, l] = sum over the (o, c) of offset group g of
// grad_output[n, o, l] * input[n, c_in, rigid point] * d scope sample / d(dh, dw). A gather, one
// thread per (n, g, k, l); the sample's corners are found once for all the (o, c).
template <typename T>
__global__ void dk_local_offset_grad(const T* __restrict__ grad_output, const T* __restrict__ input,
                                     const T* __restrict__ weight, const T* __restrict__ offset, DK_GEOMETRY,
                                     T* __restrict__ grad_offset) {
    typedef typename acc<T>::type A;
    DK_GEO;
    const index_t L = geo.L(), K = geo.K(), S = geo.scope(), hw = geo.hw(), cg = geo.cg(), og = geo.og();
    const index_t opg = geo.opg();
    CUDEFORM_LOOP(idx, batch * offset_groups * K * L) {
        const index_t ngk = fast_div(idx, L), l = idx - ngk * L;
        const index_t ng = fast_div(ngk, K), k = ngk - ng * K;
        const index_t n = fast_div(ng, offset_groups), g = ng - n * offset_groups;
        const index_t y = fast_div(l, out_w), x = l - y * out_w;
        const int i = (int)k / kw, j = (int)k % kw;
        const index_t iy = geo.in_row(y, i), ix = geo.in_col(x, j);
        const index_t oi = 2 * ngk * L + l;
        A grad_h = A(0), grad_w = A(0);
        if (iy >= 0 && iy < height && ix >= 0 && ix < width) {
            A h, w;
            geo.scope_point(i, j, offset + oi, L, h, w);
            const BilinearSlopes<A> slopes(h, w, scope_h, scope_w);
            if (slopes.live) {
                index_t wg = fast_div(g * opg, og), within = g * opg - wg * og;
                for (index_t o = g * opg; o < (g + 1) * opg; ++o) {
                    const A go = to_acc(grad_output[(n * c_out + o) * L + l]);
                    const T* px = input + (n * channels + wg * cg) * hw + iy * width + ix;
                    for (index_t c = 0; c < cg; ++c) {
                        A d_h, d_w;
                        slopes.grad(weight + (o * cg + c) * S, d_h, d_w);
                        const A v = go * to_acc(px[c * hw]);
                        grad_h += v * d_h;
                        grad_w += v * d_w;
                    }
                    if (++within == og) {
                        within = 0;
                        ++wg;
                    }
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
    const int row = blockDim.x + 1;
    const index_t S = geo.scope(), L = geo.L(), K = geo.K(), hw = geo.hw(), cg = geo.cg();
    const index_t tile = min(S, (index_t)(DK_PRIVATE_BYTES / sizeof(A) / row));
    const index_t pairs = c_out * cg, positions = batch * L, per_chunk = ceil_div(positions, chunks);
    A* const mine = sums + threadIdx.x;
    for (index_t b = blockIdx.x; b < pairs * chunks; b += gridDim.x) {
        const index_t chunk = fast_div(b, pairs), pair = b - chunk * pairs;
        const index_t o = fast_div(pair, cg), c = pair - o * cg, g = fast_div(o, geo.opg());
        const index_t c_in = fast_div(o, geo.og()) * cg + c;
        const index_t begin = chunk * per_chunk, end = min(positions, begin + per_chunk);
        for (index_t s0 = 0; s0 < S; s0 += tile) {
            const int count = (int)min(tile, S - s0);  // shared-memory offsets fit 32 bits
            for (int t = 0; t < count; ++t) mine[t * row] = A(0);
            for (index_t p = begin + threadIdx.x; p < end; p += blockDim.x) {
                const index_t n = fast_div(p, L), l = p - n * L;
                const index_t y = fast_div(l, out_w), x = l - y * out_w;
                const A go = to_acc(grad_output[(n * c_out + o) * L + l]);
                const T* plane = input + (n * channels + c_in) * hw;
                const T* off = offset + (n * offset_groups + g) * K * 2 * L + l;
                geo.for_each_local_tap<A>(y, x, off, L, [&](index_t pixel, A h, A w) {
                    const A v = go * to_acc(plane[pixel]);
                    BilinearTaps<A>(h, w, scope_h, scope_w).for_each([&](index_t s, A wt) {
                        if ((unsigned long long)(s - s0) < (unsigned long long)count) mine[(int)(s - s0) * row] += wt * v;
                    });
                });
            }
            __syncthreads();
            for (int t = threadIdx.x; t < count; t += blockDim.x) {
                A total = A(0);
                for (int r = 0; r < (int)blockDim.x; ++r) total += sums[t * row + r];
                partial[(chunk * pairs + pair) * S + s0 + t] = total;
            }
            __syncthreads();
        }
    }
}
