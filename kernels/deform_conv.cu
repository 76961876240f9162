// Deformable convolution (DCN v1/v2): im2col / col2im kernels around cuBLAS GEMMs.
// Host code: cudeform/cuda/deform_conv.py. CPU twin: cudeform/cpu/deform_conv.py.
//
// A chunk of `batch` images starting at image `n0` is processed at a time. Its columns are a
// (C_in * kh * kw, batch * pitch) matrix, row c * K + k holding the (masked) samples of input
// channel c at kernel point k, image n in columns [n * pitch, n * pitch + L), L = H_out * W_out
// (the forward pads pitch for aligned GEMM rows; the backward uses pitch = L), so one GEMM per
// weight group multiplies them.
// Every kernel is templated on the storage type T and computes in acc<T>::type.
// The half types' forward on sm_90 is dcn_fused_wgmma instead (at the end): no columns.
#include "tensor_core.cuh"

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

// Images n0.. of grad_output (N, C_out, L) -> a (C_out, batch, L) GEMM operand: a block per
// row at a time, in 16-byte vectors where the rows allow (`vectors`: L a multiple of a vector's
// elements and grad_output 16-byte aligned). A thread per element, dividing its index, moved 0.5 TB/s on an
// H200.
template <typename T>
__global__ void dcn_gather_grad_output(const T* __restrict__ grad_output, index_t c_out, index_t batch,
                                       index_t L, index_t n0, int vectors, T* __restrict__ buffer) {
    for (index_t r = blockIdx.x; r < c_out * batch; r += gridDim.x) {
        const index_t o = fast_div(r, batch), n = r - o * batch;
        const T* const src = grad_output + ((n0 + n) * c_out + o) * L;
        T* const dst = buffer + r * L;
        if (vectors) {
            for (index_t i = threadIdx.x; i < L / (16 / (index_t)sizeof(T)); i += blockDim.x)
                reinterpret_cast<uint4*>(dst)[i] = __ldg(reinterpret_cast<const uint4*>(src) + i);
        } else {
            for (index_t i = threadIdx.x; i < L; i += blockDim.x) dst[i] = src[i];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fused forward on tensor cores (sm_90a, the half types; host: _fused_forward): an implicit
// GEMM, out[n, o, l] = sum over (k, c) of weight[o, c, k] * mask * sample(input[n, c], p(l, k)),
// with no columns. A block tile is BM output channels (of one weight group) by BN positions (of
// one image); the reduction goes in stages of BK channels of one kernel point. A, the weight
// reordered (C_out, K, Cg), is copied by cp.async; B, the stage's samples (rows: positions,
// elements: channels), is gathered and blended by the threads straight into shared memory,
// while the tensor cores multiply the previous stage. Both are K-major in wgmma's 128-byte
// swizzle, two stages deep.
// The sampling: a thread blends 8 channels (one 16-byte vector per corner, the input made
// channels-last) of BN / 64 positions a stage, keeping each position's corners and bilinear
// weights (the mask folded in) from one kernel point (and offset group) to the next; float32
// blends, rounded once.
// ---------------------------------------------------------------------------------------------
namespace dcn_fused {
// 4 warpgroups, each 64 output channels of the tile by all its BN positions (128, or 64 where
// 128 leaves SMs idle): the gather of a stage serves 256 output channels (at 128 by 128 it
// took as long as the MMAs it fed), and 16 warps keep more of it in flight.
constexpr int BM = 256, BK = 64, THREADS = 512;
constexpr int A_TILE = BM * BK, B_TILE_MAX = 128 * BK;  // elements of a stage's tiles
// A thread's rows of a tile (A's output channels, B's positions): row + ROWS_APART * t.
constexpr int ROWS_APART = THREADS / (BK / 8), A_COPIES = BM / ROWS_APART;
constexpr int STAGES = 2;
// 1024 bytes of slack to align the tiles to the swizzle's atoms, then the stages of A and B.
constexpr int SHARED_BYTES = 1024 + STAGES * (A_TILE + B_TILE_MAX) * 2;  // FUSED_SHARED_BYTES in the host
static_assert(A_COPIES * ROWS_APART == BM, "a thread's rows cover whole tiles");
static_assert(BM * (128 + 8) <= STAGES * (A_TILE + B_TILE_MAX), "the output tile fits the pipeline's memory");
static_assert(SHARED_BYTES <= 227 * 1024, "a block fits an SM");
}  // namespace dcn_fused

// What dcn_fused_wgmma reads, made in one launch: the first `layout_blocks` blocks make the
// input channels-last (tensor_core.cuh), the others reorder the weight (C_out, Cg, K) into
// weight_r (C_out, K, Cg), a slice of 64 channels of an output channel at a time through
// shared memory (16-byte loads and stores; a thread per element, reading a K-strided column,
// took 10 us for 512 x 512 x 3 x 3 on an H200). Dynamic shared memory: the larger of
// CHANNELS_LAST_SHARED and 64 * K elements.
template <typename T>
__global__ void __launch_bounds__(256) dcn_fused_operands(const T* __restrict__ input, const T* __restrict__ weight,
                                                          int layout_blocks, index_t batch, index_t channels,
                                                          index_t hw, index_t c_out, int cg, int K,
                                                          T* __restrict__ input_cl, T* __restrict__ weight_r) {
    extern __shared__ __align__(16) unsigned char dcn_shared[];
    if ((int)blockIdx.x < layout_blocks) {
        channels_last(input, batch, channels, hw, input_cl, dcn_shared, blockIdx.x, layout_blocks);
        return;
    }
    T* const slab = reinterpret_cast<T*>(dcn_shared);  // [64][K]: weight[o, c0 + c, k]
    const index_t slices = (cg + 63) / 64;
    for (index_t unit = blockIdx.x - layout_blocks; unit < c_out * slices; unit += gridDim.x - layout_blocks) {
        const index_t o = fast_div(unit, slices);
        const int c0 = (int)(unit - o * slices) * 64, chunks = min(64, cg - c0) / 8;
        __syncthreads();  // the previous slice's reads are done
        const uint4* const src = reinterpret_cast<const uint4*>(weight + (o * cg + c0) * K);
        for (int v = threadIdx.x; v < chunks * K; v += blockDim.x) reinterpret_cast<uint4*>(slab)[v] = __ldg(src + v);
        __syncthreads();
        for (int v = threadIdx.x; v < K * chunks; v += blockDim.x) {
            const int k = v / chunks, c = (v - k * chunks) * 8;
            __align__(16) T packed[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) packed[e] = slab[(c + e) * K + k];
            *reinterpret_cast<uint4*>(weight_r + (o * K + k) * cg + c0 + c) = *reinterpret_cast<const uint4*>(packed);
        }
    }
}

// A block per (image, weight group, tile of BN positions, tile of BM output channels), grid-
// stride, the output-channel tiles of a position tile adjacent (their gathers meet in L2).
// `input` is (N, H, W, C_in) with a plane of it within 32-bit indices (the host checks),
// `weight` (C_out, K, Cg); Cg and C_in / offset_groups are multiples of 8. Output plus bias,
// rounded once.
template <typename T, int BN>
__global__ void __launch_bounds__(dcn_fused::THREADS, 1)
dcn_fused_wgmma(const T* __restrict__ input, const T* __restrict__ weight, const T* __restrict__ offset,
                const T* __restrict__ mask, int use_mask, const T* __restrict__ bias, int use_bias, DCN_GEOMETRY,
                index_t c_out, int groups, T* __restrict__ out) {
#if CUDEFORM_WGMMA
    using namespace dcn_fused;
    constexpr int B_TILE = BN * BK, B_ROWS = BN / ROWS_APART, OUT_PITCH = BN + 8;
    static_assert(B_ROWS * ROWS_APART == BN, "a thread's rows cover whole tiles");
    extern __shared__ __align__(16) unsigned char dcn_shared[];
    T* const a_base = reinterpret_cast<T*>(dcn_shared + ((1024 - (shared_address(dcn_shared) & 1023)) & 1023));
    T* const b_base = a_base + STAGES * A_TILE;
    const int tid = threadIdx.x, wg = tid >> 7;  // its warpgroup
    const int K = kh * kw, cg = (int)(channels / groups), og = (int)(c_out / groups);
    const int per_offset_group = (int)(channels / offset_groups);
    const index_t L = out_h * out_w, m_tiles = (og + BM - 1) / BM, n_tiles = (L + BN - 1) / BN;
    const int stages = K * ((cg + BK - 1) / BK);
    const int plane = (int)(height * width * channels), row_step = (int)(width * channels), C = (int)channels;
    // The thread's rows and 8 elements of every tile, and where they land (the same for every
    // row + ROWS_APART * t: the swizzle repeats every 8 rows).
    const int row = tid / (BK / 8), chunk = tid % (BK / 8) * 8, at = swizzled(row, chunk);

    // A thread's offset group changes inside a weight group only where C_in / offset_groups is
    // not a multiple of Cg (then it is worked out every stage).
    const bool group_moves = per_offset_group % cg != 0;

    for (index_t tile = blockIdx.x; tile < batch * groups * n_tiles * m_tiles; tile += gridDim.x) {
        const index_t q = fast_div(tile, m_tiles), ng = fast_div(q, n_tiles), n = fast_div(ng, groups);
        const index_t g = ng - n * groups, img = n0 + n;
        const int l0 = (int)(q - ng * n_tiles) * BN;
        const int o0 = (int)(tile - q * m_tiles) * BM, a_rows = min(BM, og - o0);
        const T* const a_src = weight + (g * og + o0 + row) * K * cg + chunk;
        const T* const x = input + img * plane + g * cg + chunk;

        // The input row and column of kernel point (0, 0) at the thread's positions; past L, a
        // row no point brings inside.
        int y_at[B_ROWS], x_at[B_ROWS];
#pragma unroll
        for (int t = 0; t < B_ROWS; ++t) {
            const int l = l0 + row + ROWS_APART * t, y = l / (int)out_w;
            y_at[t] = l < (int)L ? y * sh - ph : -(1 << 30);
            x_at[t] = (l - y * (int)out_w) * sw - pw;
        }
        // The samples of those positions at the current kernel point and offset group: the
        // (floor, floor) corner's offset in the image, the bilinear weights times the mask, and
        // which corners lie inside (bit 4 t + corner).
        int at00[B_ROWS];
        float w00[B_ROWS], w01[B_ROWS], w10[B_ROWS], w11[B_ROWS];
        unsigned inside = 0;
        int sampled_k = -1, sampled_group = -1;
        auto sample = [&](int k, int group) {
            const int i = k / kw, j = k - i * kw;
            const index_t gk = (img * offset_groups + group) * K + k;
            const T* const off_h = offset + 2 * gk * L;
            const T* const gate = mask + gk * L;
            inside = 0;
#pragma unroll
            for (int t = 0; t < B_ROWS; ++t) {
                const int l = l0 + row + ROWS_APART * t;
                at00[t] = 0;
                w00[t] = w01[t] = w10[t] = w11[t] = 0.0f;
                if (y_at[t] < -(1 << 29)) continue;
                const float h = (float)(y_at[t] + i * dh) + to_acc(off_h[l]);
                const float w = (float)(x_at[t] + j * dw) + to_acc(off_h[L + l]);
                if (!in_open_box(h, w, height, width)) continue;
                const float fh = floorf(h), fw = floorf(w), lh = h - fh, lw = w - fw;
                const float m = use_mask ? to_acc(gate[l]) : 1.0f;
                const int y0 = (int)fh, x0 = (int)fw;
                const bool top = y0 >= 0, bottom = y0 + 1 < (int)height, left = x0 >= 0, right = x0 + 1 < (int)width;
                inside |= ((unsigned)(top && left) | (unsigned)(top && right) << 1 | (unsigned)(bottom && left) << 2
                           | (unsigned)(bottom && right) << 3) << (4 * t);
                w00[t] = m * ((1.0f - lh) * (1.0f - lw));
                w01[t] = m * ((1.0f - lh) * lw);
                w10[t] = m * (lh * (1.0f - lw));
                w11[t] = m * (lh * lw);
                at00[t] = y0 * row_step + x0 * C;
            }
            sampled_k = k;
            sampled_group = group;
        };
        const int fixed_group = (int)(g * cg / per_offset_group);

        int k = 0, c0 = 0;  // the next stage's kernel point and first channel
        auto load_next = [&](int buf) {
            const bool c_ok = c0 + chunk < cg;
            T* const a_dst = a_base + buf * A_TILE + at;
            const T* const a_stage = a_src + k * cg + c0;
#pragma unroll
            for (int t = 0; t < A_COPIES; ++t) {
                const bool a = c_ok && row + ROWS_APART * t < a_rows;
                copy_async_16(a_dst + ROWS_APART * t * 64, a ? a_stage + ROWS_APART * t * K * cg : weight, a);
            }
            copy_async_commit();
            if (c_ok) {
                const int group = group_moves ? (int)(g * cg + c0 + chunk) / per_offset_group : fixed_group;
                if (k != sampled_k || group != sampled_group) sample(k, group);
            }
            // All corners' loads first, then the blends: the loads' latencies overlap.
            const T* const xc = x + c0;
            uint4 raw[B_ROWS][4];
#pragma unroll
            for (int t = 0; t < B_ROWS; ++t) {
                const unsigned in = c_ok ? inside >> (4 * t) : 0u;
                const T* const p = xc + at00[t];
                raw[t][0] = in & 1 ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
                raw[t][1] = in & 2 ? __ldg(reinterpret_cast<const uint4*>(p + C)) : make_uint4(0, 0, 0, 0);
                raw[t][2] = in & 4 ? __ldg(reinterpret_cast<const uint4*>(p + row_step)) : make_uint4(0, 0, 0, 0);
                raw[t][3] = in & 8 ? __ldg(reinterpret_cast<const uint4*>(p + row_step + C)) : make_uint4(0, 0, 0, 0);
            }
            T* const b_dst = b_base + buf * B_TILE + at;
            if (!c_ok) {  // past the group's channels: zeros (A's are too, and 0 * NaN is not 0)
#pragma unroll
                for (int t = 0; t < B_ROWS; ++t)
                    *reinterpret_cast<uint4*>(b_dst + ROWS_APART * t * 64) = make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int t = 0; t < B_ROWS && c_ok; ++t) {
                const T* e00 = reinterpret_cast<const T*>(&raw[t][0]);
                const T* e01 = reinterpret_cast<const T*>(&raw[t][1]);
                const T* e10 = reinterpret_cast<const T*>(&raw[t][2]);
                const T* e11 = reinterpret_cast<const T*>(&raw[t][3]);
                __align__(16) T packed[8];
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    packed[e] = from_acc<T>(w00[t] * to_acc(e00[e]) + w01[t] * to_acc(e01[e]) + w10[t] * to_acc(e10[e])
                                            + w11[t] * to_acc(e11[e]));
                *reinterpret_cast<uint4*>(b_dst + ROWS_APART * t * 64) = *reinterpret_cast<const uint4*>(packed);
            }
            c0 += BK;
            if (c0 >= cg) c0 = 0, ++k;
        };

        float accum[BN / 2];
#pragma unroll
        for (int e = 0; e < BN / 2; ++e) accum[e] = 0.0f;
        load_next(0);
        for (int s = 0; s < stages; ++s) {
            copy_async_wait<0>();
            fence_proxy_async();
            // Stage s is in shared memory for every thread; every warpgroup is done with s - 1.
            __syncthreads();
            const unsigned long long a_desc = wgmma_desc(a_base + (s % STAGES) * A_TILE + wg * 64 * BK, 1024, 16);
            const unsigned long long b_desc = wgmma_desc(b_base + (s % STAGES) * B_TILE, 1024, 16);
#pragma unroll
            for (int e = 0; e < BN / 2; ++e) wgmma_operand(accum[e]);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) Wgmma<T, BN, 0, 0>::run(accum, a_desc + kk * 2, b_desc + kk * 2);
            wgmma_commit();
            // The next stage's gather overlaps this one's MMAs.
            if (s + 1 < stages) load_next((s + 1) % STAGES);
            wgmma_wait<0>();
#pragma unroll
            for (int e = 0; e < BN / 2; ++e) wgmma_operand(accum[e]);
        }

        // Epilogue: the accumulators plus bias into a shared tile, then stored a row at a time.
        __syncthreads();
        T* const tile_out = a_base;
        stage_accumulators<T, BN>(accum, bias + g * og + o0, use_bias, a_rows, tile_out, OUT_PITCH);
        __syncthreads();
        store_tile(tile_out, OUT_PITCH, BM, BN, a_rows, out, img * c_out + g * og + o0, (index_t)l0, L, THREADS);
        __syncthreads();  // the next tile's first stage reuses the memory
    }
#endif
}

// ---------------------------------------------------------------------------------------------
// The half types' backward on sm_90 (host: _fused_backward). The column gradients and the
// columns are (positions, K, Cg) per weight group, channels contiguous, made and consumed by
// cuBLAS, and the input is channels-last (dcn_fused_operands), so a thread's 4 channels at a
// sampling point are one 8-byte vector of each: the corners' loads, the column gradient's, the
// columns' store, and the input gradient's float32 atomic (one 16-byte vector atomic per corner,
// into a channels-last accumulator). The NCHW kernels above scatter a scalar atomic per
// channel plane: on an H200 at 16 x 128 x 64 x 64, dcn_col2im alone took 1.7 ms of a 2.7 ms
// forward+backward.
// ---------------------------------------------------------------------------------------------

// A sampling point inside the box where it sees the image: its (floor, floor) corner, the
// bilinear weights, and which of the corners 00, 01, 10, 11 (bit q) lie inside the image.
struct ClPoint {
    int y0, x0;
    float lh, lw, w[4];
    unsigned inside;
    __device__ __forceinline__ ClPoint(float h, float w_, index_t height, index_t width) {
        const float fh = floorf(h), fw = floorf(w_);
        y0 = (int)fh;
        x0 = (int)fw;
        lh = h - fh;
        lw = w_ - fw;
        w[0] = (1.0f - lh) * (1.0f - lw);
        w[1] = (1.0f - lh) * lw;
        w[2] = lh * (1.0f - lw);
        w[3] = lh * lw;
        const bool top = y0 >= 0, bottom = y0 + 1 < height, left = x0 >= 0, right = x0 + 1 < width;
        inside = (unsigned)(top && left) | (unsigned)(top && right) << 1 | (unsigned)(bottom && left) << 2
               | (unsigned)(bottom && right) << 3;
    }
    // Element offset of corner q in a channels-last image of C channels (an image is within
    // 32-bit indices: the host checks).
    __device__ __forceinline__ int corner(int q, int width, int C) const {
        return ((y0 + (q >> 1)) * width + x0 + (q & 1)) * C;
    }
};

// 4 channels (8 bytes) from `image` (channels-last, at the first of them) at each corner, as
// float; 0 outside the image.
template <typename T>
__device__ __forceinline__ void load_corners(const T* image, const ClPoint& p, int width, int C, float v[4][4]) {
    uint2 raw[4];
#pragma unroll
    for (int q = 0; q < 4; ++q)
        raw[q] = p.inside >> q & 1 ? __ldg(reinterpret_cast<const uint2*>(image + p.corner(q, width, C)))
                                   : make_uint2(0, 0);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const T* e = reinterpret_cast<const T*>(&raw[q]);
#pragma unroll
        for (int i = 0; i < 4; ++i) v[q][i] = to_acc(e[i]);
    }
}

// Where a thread of dcn_col2im_cl samples: a position (l, fastest, as in offset and mask) of
// image n, walking the kernel points with pointers into offset and mask (the index arithmetic
// once per thread, not per point).
struct ClPosition {
    index_t n, l;
    int y, x;
    __device__ __forceinline__ ClPosition(index_t nl, DCN_GEOMETRY) {
        const index_t L = out_h * out_w, yy = fast_div(nl, out_w);
        n = fast_div(nl, L);
        l = nl - n * L;
        y = (int)(yy - n * out_h) * sh - ph;
        x = (int)(nl - yy * out_w) * sw - pw;
    }
    // The offset group's planes of kernel point 0 in offset and mask, at the position.
    __device__ __forceinline__ index_t first_point(int group, DCN_GEOMETRY) const {
        return ((n0 + n) * offset_groups + group) * kh * kw;
    }
};

// Kernel point (i, j)'s sampling point and mask value, from pointers at its planes.
template <typename T>
__device__ __forceinline__ void cl_point(const T* off, const T* gate, index_t L, int use_mask, const ClPosition& at,
                                         int i, int j, int dh, int dw, float& h, float& w, float& m) {
    h = (float)(at.y + i * dh) + to_acc(off[0]);
    w = (float)(at.x + j * dw) + to_acc(off[L]);
    m = use_mask ? to_acc(gate[0]) : 1.0f;
}

// Four adjacent lanes (j = lane % 4; the four, and only they, call together) hold the rows of
// a 4 x 4 matrix, a[e] = M[j][e]; t[i] = M[i][j] gets its column. Round r, lane j reads lane
// (j + r) % 4's element j, which that lane offers as its element (own - r) % 4.
__device__ __forceinline__ void quad_transpose(const float a[4], float t[4], int j) {
    const int first = threadIdx.x & (WARP_SIZE - 4);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int give = (j - r) & 3, from = (j + r) & 3;
        const float offer = give == 0 ? a[0] : give == 1 ? a[1] : give == 2 ? a[2] : a[3];
        const float got = __shfl_sync(0xfu << first, offer, first | from);
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (i == from) t[i] = got;
    }
}

// Input, offset and mask gradients from the column gradients in `cols` (a chunk of images),
// which it replaces with the columns of the weight gradient (but in CL_MAX_ABS): the corners it
// loads for the offset gradient are those the samples blend (a separate im2col, loading them
// again, took 93 of a 660 us backward at 16,128,64,64 in fp16 on an H200). A
// thread item is a position of an offset group, `slices` adjacent threads (a power of two, at
// most a warp) sharing it: each takes 4 channels of every stretch of 4 * slices, so each
// 16-byte atomic of a warp lands beside its neighbour's (whole 32-byte sectors: with 8
// contiguous channels a thread, every other 16 bytes, L2 took ~1.5 sectors per atomic). They
// sum the offset and mask gradients with shuffles, and one writes them. `grad` is the
// (N, H, W, C) float32 accumulator. closed_low: the "torchvision" border rule, as in
// dcn_col2im_coord.
// MODE: CL_FLOAT, float atomics into `grad`; deterministic mode's two passes (as the NCHW
// kernels'), CL_MAX_ABS, the largest finite |mask * column gradient| of the chunk into
// `max_abs_bits` (nothing else), then CL_FIXED, 64-bit fixed-point atomics into `fixed`
// (batch, H, W, C), non-finite contributions into `grad`.
// Three blocks an SM (80 registers): at 112 registers (two blocks) the forward+backward took
// 1.03-1.04x as long at 16,128,64,64 and 2,256,100,152 in fp16 on an H200, though the float mode
// spills 48 bytes at 80.
enum { CL_FLOAT, CL_MAX_ABS, CL_FIXED };
template <typename T, int MODE>
__global__ void __launch_bounds__(256, 3) dcn_col2im_cl(T* __restrict__ cols, const T* __restrict__ input,
                                                     const T* __restrict__ offset, const T* __restrict__ mask,
                                                     int use_mask, int closed_low, DCN_GEOMETRY, int groups,
                                                     int slices, float* __restrict__ grad,
                                                     unsigned int* __restrict__ max_abs_bits,
                                                     unsigned long long* __restrict__ fixed,
                                                     T* __restrict__ grad_offset, T* __restrict__ grad_mask) {
    const index_t L = out_h * out_w, bL = batch * L, items = batch * offset_groups * L;
    const int K = kh * kw, C = (int)channels, W = (int)width, cg = C / groups;
    const int per_group = (int)(channels / offset_groups), quads = per_group / (4 * slices);
    const double scale = MODE == CL_FIXED ? fixed_point_scale(*max_abs_bits, (index_t)K * L) : 0.0;
    float largest = 0.0f;  // CL_MAX_ABS
    // Whole warps: the shuffles need every lane.
    CUDEFORM_LOOP(t, (items * slices + WARP_SIZE - 1) / WARP_SIZE * WARP_SIZE) {
        const bool valid = t < items * slices;
        const index_t item = fast_div(valid ? t : 0, slices), ng = fast_div(item, L);
        const int s = (int)((valid ? t : 0) - item * slices);
        const index_t n = fast_div(ng, offset_groups);
        const int group = (int)(ng - n * offset_groups);
        const ClPosition at(n * L + item - ng * L, DCN_GEOMETRY_ARGS);
        const index_t plane = at.first_point(group, DCN_GEOMETRY_ARGS) * L + at.l;
        const T* off = offset + 2 * plane - at.l;  // 2 * gk * L + l
        const T* gate = mask + plane;
        T* g_off = grad_offset + 2 * plane - at.l;
        T* g_gate = grad_mask + plane;
        const T* const image = input + (n0 + n) * height * width * C;
        float* const g_image = grad + (n0 + n) * height * width * C;
        unsigned long long* const f_image = fixed + n * height * width * C;
        // The thread's first channel and its weight group; the column gradients of the position.
        const int c_first = group * per_group + s * 4, wg_first = c_first / cg;
        T* const gpos = cols + (n * L + at.l) * K * cg;
        for (int i = 0, k = 0; i < kh; ++i) {
            for (int j = 0; j < kw; ++j, ++k, off += 2 * L, gate += L, g_off += 2 * L, g_gate += L) {
                if (MODE == CL_MAX_ABS) {
                    // Every kernel point, those whose sample misses the image included: a bound
                    // is all the fixed point needs.
                    const float m = use_mask && valid ? to_acc(gate[0]) : 1.0f;
                    int c_wg = c_first - wg_first * cg, wg = wg_first;
                    for (int r = 0; r < quads && valid; ++r) {
                        const uint2 graw = *reinterpret_cast<const uint2*>(gpos + wg * bL * K * cg + k * cg + c_wg);
                        const T* ge = reinterpret_cast<const T*>(&graw);
#pragma unroll
                        for (int e = 0; e < 4; ++e) keep_max_abs(largest, m * to_acc(ge[e]));
                        for (c_wg += 4 * slices; c_wg >= cg; c_wg -= cg) ++wg;
                    }
                    continue;
                }
                float h, w, m, grad_h = 0.0f, grad_w = 0.0f, grad_m = 0.0f;
                cl_point(off, gate, L, use_mask, at, i, j, dh, dw, h, w, m);
                const bool live = valid && (h > -1.0f || (closed_low && h == -1.0f)) && h < (float)height
                               && (w > -1.0f || (closed_low && w == -1.0f)) && w < (float)width;
                if (live) {
                    const bool open = in_open_box(h, w, height, width);
                    const ClPoint p(h, w, height, width);
                    int c = c_first, wg = wg_first, c_wg = c_first - wg_first * cg;  // c = wg * cg + c_wg
                    for (int r = 0; r < quads; ++r) {
                        T* const gq = gpos + wg * bL * K * cg + k * cg + c_wg;
                        const uint2 graw = *reinterpret_cast<const uint2*>(gq);
                        const T* ge = reinterpret_cast<const T*>(&graw);
                        float v[4][4], gc[4];
                        load_corners(image + c, p, W, C, v);
                        // The columns of the weight gradient take the place of the column
                        // gradients just read (no other thread reads these): float32 blends with
                        // the mask folded into the weights, rounded once, as dcn_fused_wgmma.
                        __align__(8) T col[4];
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            col[e] = from_acc<T>(open ? m * p.w[0] * v[0][e] + m * p.w[1] * v[1][e]
                                                            + m * p.w[2] * v[2][e] + m * p.w[3] * v[3][e]
                                                      : 0.0f);
                        *reinterpret_cast<uint2*>(gq) = *reinterpret_cast<const uint2*>(col);
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            gc[e] = to_acc(ge[e]);
                            grad_h += gc[e] * ((1.0f - p.lw) * (v[2][e] - v[0][e]) + p.lw * (v[3][e] - v[1][e]));
                            grad_w += gc[e] * ((1.0f - p.lh) * (v[1][e] - v[0][e]) + p.lh * (v[3][e] - v[2][e]));
                            grad_m += gc[e] * (p.w[0] * v[0][e] + p.w[1] * v[1][e] + p.w[2] * v[2][e]
                                               + p.w[3] * v[3][e]);
                        }
                        // CL_FIXED: the 64-bit atomics of a lane's 4 channels would each fill a
                        // quarter of a sector; four adjacent lanes (16 channels) trade their
                        // column gradients so that lane s % 4 holds channel 4 e + s % 4 in gt[e].
                        float gt[4];
                        if (MODE == CL_FIXED && slices % 4 == 0) quad_transpose(gc, gt, s & 3);
                        if (open) {
#pragma unroll
                            for (int q = 0; q < 4; ++q) {
                                const float f = m * p.w[q];
                                if (!(p.inside >> q & 1)) continue;
                                const int at_c = p.corner(q, W, C) + c;
                                if (MODE == CL_FLOAT) {
                                    atomic_add_quad(g_image + at_c, make_float4(f * gc[0], f * gc[1], f * gc[2],
                                                                                f * gc[3]));
                                } else if (slices % 4 == 0) {
                                    // gt holds channel 4 e + s % 4 of the lanes' 16 (see above): one
                                    // atomic instruction fills whole 32-byte sectors.
#pragma unroll
                                    for (int e = 0; e < 4; ++e) {
                                        const int at_e = at_c - 4 * (s & 3) + 4 * e + (s & 3);
                                        atomic_add_fixed(f_image + at_e, g_image + at_e, f * gt[e], scale);
                                    }
                                } else {
#pragma unroll
                                    for (int e = 0; e < 4; ++e)
                                        atomic_add_fixed(f_image + at_c + e, g_image + at_c + e, f * gc[e], scale);
                                }
                            }
                        }
                        c += 4 * slices;
                        for (c_wg += 4 * slices; c_wg >= cg; c_wg -= cg) ++wg;
                    }
                } else if (valid) {  // a sample that misses the image: columns of zeros
                    int wg = wg_first, c_wg = c_first - wg_first * cg;
                    for (int r = 0; r < quads; ++r) {
                        *reinterpret_cast<uint2*>(gpos + wg * bL * K * cg + k * cg + c_wg) = make_uint2(0, 0);
                        for (c_wg += 4 * slices; c_wg >= cg; c_wg -= cg) ++wg;
                    }
                }
                for (int d = 1; d < slices; d <<= 1) {
                    grad_h += __shfl_xor_sync(0xffffffffu, grad_h, d);
                    grad_w += __shfl_xor_sync(0xffffffffu, grad_w, d);
                    grad_m += __shfl_xor_sync(0xffffffffu, grad_m, d);
                }
                if (valid && s == 0) {
                    g_off[0] = from_acc<T>(m * grad_h);
                    g_off[L] = from_acc<T>(m * grad_w);
                    if (use_mask) g_gate[0] = from_acc<T>(grad_m);
                }
            }
        }
    }
    if (MODE == CL_MAX_ABS) warp_atomic_max_abs(max_abs_bits, largest);
}

// The weight gradient from its float32 accumulator in weight_r's layout (C_out, K, Cg).
template <typename T>
__global__ void dcn_weight_grad_cl(const float* __restrict__ acc_r, index_t c_out, int cg, int K,
                                   T* __restrict__ grad_weight) {
    CUDEFORM_LOOP(idx, c_out * cg * K) {
        const index_t oc = fast_div(idx, K), o = fast_div(oc, cg);
        const int k = (int)(idx - oc * K), c = (int)(oc - o * cg);
        grad_weight[idx] = from_acc<T>(acc_r[(o * K + k) * cg + c]);
    }
}

// The input gradient from its (N, H*W, C) float32 accumulator: (N, C, H*W) in T, through
// 32 x 32 tiles in shared memory (both sides' accesses whole rows of a warp).
template <typename T>
__global__ void __launch_bounds__(256) dcn_input_grad_cl(const float* __restrict__ acc, index_t images,
                                                         index_t channels, index_t positions, T* __restrict__ grad) {
    __shared__ float tile[32][33];
    const int lane = threadIdx.x & 31, row0 = threadIdx.x >> 5;
    const index_t ct = (channels + 31) / 32, pt = (positions + 31) / 32;
    for (index_t t = blockIdx.x; t < images * ct * pt; t += gridDim.x) {
        const index_t n = fast_div(t, ct * pt), rest = t - n * ct * pt, cq = fast_div(rest, pt);
        const index_t c0 = cq * 32, p0 = (rest - cq * pt) * 32;
        __syncthreads();  // the previous tile's reads are done
        for (int r = row0; r < 32; r += 8) {
            if (p0 + r < positions && c0 + lane < channels)
                tile[r][lane] = acc[(n * positions + p0 + r) * channels + c0 + lane];
        }
        __syncthreads();
        for (int r = row0; r < 32; r += 8) {
            if (c0 + r < channels && p0 + lane < positions)
                grad[(n * channels + c0 + r) * positions + p0 + lane] = from_acc<T>(tile[lane][r]);
        }
    }
}
