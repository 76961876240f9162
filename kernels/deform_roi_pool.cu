// Deformable RoI pooling: deform_roi_pool (mmcv's DeformRoIPool: RoIAlign sampling, optional
// modulation mask) and deform_psroi_pool (MSRA's deformable position-sensitive RoI pooling).
// Host code: cudeform/cuda/deform_roi_pool.py. CPU twin: cudeform/cpu/deform_roi_pool.py.
//
// Forward: one thread per output element, as torchvision's roi_align. deform_roi_pool's backward:
// one kernel whose blocks take a 64-channel chunk of 32 (RoI, bin) items, chunk by chunk,
// scattering the input gradient with atomics (each distinct corner of a bin once) and, with an
// offset or a mask, reading the same corners to reduce their gradients (sums over the chunk's
// channels) in shared memory; a small kernel adds the chunks' sums. Its deterministic mode,
// with sampling_ratio > 0, gathers the input gradient instead, from a list of the bins'
// corners sorted by input pixel (droi_list_corners and after). deform_psroi_pool's
// backward gathers the input gradient instead (each input channel is read by few bins: a
// block lists those that touch its tile of pixels, and each pixel sums them), which needs no
// atomics and is deterministic as it stands; its offset gradient takes one warp per (RoI,
// class, part cell), its lanes splitting the channels (and the cell's bins), reduced with
// shuffles. One thread writes each reduced value, so no address sees more than one write.
//
// A RoI whose batch index is not in [0, N) pools zeros and gets zero gradients: the kernels
// never read outside the input, and the host never synchronises to check the indices.
#include "common.cuh"

using namespace cudeform;

// The batch index of a RoI (its integer part), or -1 when it is not in [0, batch) or NaN.
template <typename A>
__device__ __forceinline__ index_t roi_image(A b, index_t batch) {
    return (b >= A(0) && b < A(batch)) ? (index_t)b : index_t(-1);
}

// deform_roi_pool's input gradient: float atomics into an accumulator, or in deterministic mode
// each element's finite contributions as a 64-bit fixed-point sum (scale from
// fixed_point_scale) and its non-finite ones as two bits of a `special` word (16 elements a
// word): +inf seen, -inf seen, both for NaN. Both are sums that do not depend on the order, and
// roi_pool_fixed_finish turns them into the gradient in one pass, so that mode needs no
// floating-point accumulator (nor its zeroing and extra passes).
template <typename A>
struct InputGrad {
    A* grad;
    unsigned long long* fixed;
    unsigned int* special;
    int deterministic;
    double scale;

    __device__ __forceinline__ void add(index_t i, A v) const {
        if (!deterministic) {
            atomic_add(grad + i, v);
        } else if (isfinite(v)) {
            atomicAdd(fixed + i, (unsigned long long)llrint((double)v * scale));
        } else {
            atomicOr(special + (i >> 4), (isnan(v) ? 3u : v > A(0) ? 1u : 2u) << ((i & 15) * 2));
        }
    }

    // Elements i (even) and i + 1: one vector atomic where the GPU has them (there are no
    // 64-bit fixed-point ones).
    __device__ __forceinline__ void add_pair(index_t i, A a, A b) const {
        if (!deterministic) {
            atomic_add_pair(grad + i, a, b);
        } else {
            add(i, a);
            add(i + 1, b);
        }
    }
};

// Deterministic mode, pass 1: the largest finite |grad_output * mask| (R, C, bins). Each bin
// spreads at most that much over the input (its sample weights sum to at most 1), so with
// R * bins terms it bounds every input pixel's sum for fixed_point_scale. Launch few enough
// threads that each reads many elements, and one atomic per warp.
template <typename T>
__global__ void roi_pool_max_abs(const T* __restrict__ grad_output, const T* __restrict__ mask, int use_mask,
                                 index_t channels, index_t bins, index_t n, unsigned int* __restrict__ max_abs_bits) {
    typedef typename acc<T>::type A;
    A local = A(0);
    CUDEFORM_LOOP(i, n) {
        A v = to_acc(grad_output[i]);
        if (use_mask) {
            const index_t rc = fast_div(i, bins);
            v *= to_acc(mask[fast_div(rc, channels) * bins + (i - rc * bins)]);
        }
        keep_max_abs(local, v);
    }
    warp_atomic_max_abs(max_abs_bits, local);
}

// Deterministic mode, last pass: the input gradient in the storage type, from the fixed-point
// sums (`terms` as for the scale) and the special bits.
template <typename T>
__global__ void roi_pool_fixed_finish(const unsigned long long* __restrict__ fixed,
                                      const unsigned int* __restrict__ special,
                                      const unsigned int* __restrict__ max_abs_bits, index_t terms, index_t n,
                                      T* __restrict__ out) {
    typedef typename acc<T>::type A;
    const double scale = fixed_point_scale(*max_abs_bits, terms);
    const float inf = __int_as_float(0x7f800000), qnan = __int_as_float(0x7fffffff);
    CUDEFORM_LOOP(i, n) {
        const unsigned int bits = (special[i >> 4] >> ((i & 15) * 2)) & 3u;
        const A v = bits == 0 ? (A)fixed_to_double(fixed[i], scale) : A(bits == 1 ? inf : bits == 2 ? -inf : qnan);
        out[i] = from_acc<T>(v);
    }
}

// ---------------------------------------------------------------------------------------------
// deform_roi_pool (SPEC.md section 2)
// ---------------------------------------------------------------------------------------------

// The non-array arguments of every deform_roi_pool kernel, in this order (see the host).
#define DROI_GEOMETRY                                                                           \
    index_t num_rois, index_t batch, index_t channels, index_t height, index_t width,          \
    int pooled_h, int pooled_w, typename acc<T>::type spatial_scale, int sampling_ratio,       \
    typename acc<T>::type gamma

// The sampling grid of bin l of RoI r, offset included, in mmcv's order of operations: the
// forward walks a bin's samples through for_each_sample, the backward two rows by two columns
// (SamplePair), both at sample_h, sample_w.
template <typename A>
struct RoIAlignBin {
    index_t image;        // -1: the RoI pools zeros
    A y, x;               // the bin's corner
    A bin_h, bin_w;
    A step_h, step_w;     // d(sample position) / d(offset): gamma * roi size
    int grid_h, grid_w;
    A count;

    template <typename T>
    __device__ __forceinline__ RoIAlignBin(const T* rois, const T* offset, int use_offset, index_t r, index_t l,
                                           index_t batch, int pooled_h, int pooled_w, A spatial_scale,
                                           int sampling_ratio, A gamma) {
        const index_t bins = (index_t)pooled_h * pooled_w;
        const T* roi = rois + r * 5;
        image = roi_image(to_acc(roi[0]), batch);
        const A start_w = to_acc(roi[1]) * spatial_scale - A(0.5);
        const A start_h = to_acc(roi[2]) * spatial_scale - A(0.5);
        const A roi_w = (to_acc(roi[3]) * spatial_scale - A(0.5)) - start_w;
        const A roi_h = (to_acc(roi[4]) * spatial_scale - A(0.5)) - start_h;
        bin_h = roi_h / A(pooled_h);
        bin_w = roi_w / A(pooled_w);
        // A RoI of negative size has no samples (mmcv multiplies two negative grids).
        grid_h = sampling_ratio > 0 ? sampling_ratio : max((int)ceil(roi_h / A(pooled_h)), 0);
        grid_w = sampling_ratio > 0 ? sampling_ratio : max((int)ceil(roi_w / A(pooled_w)), 0);
        count = A(max(grid_h * grid_w, 1));
        step_w = gamma * roi_w;
        step_h = gamma * roi_h;
        const A dx = use_offset ? step_w * to_acc(offset[r * 2 * bins + l]) : A(0);
        const A dy = use_offset ? step_h * to_acc(offset[(r * 2 + 1) * bins + l]) : A(0);
        y = (start_h + dy) + A((int)(l / pooled_w)) * bin_h;
        x = (start_w + dx) + A((int)(l % pooled_w)) * bin_w;
    }

    // The row of samples iy and the column of samples ix. (iy + 0.5 in A: in double it costs
    // three conversions per coordinate, and the value is the same.)
    __device__ __forceinline__ A sample_h(int iy) const { return y + (A(iy) + A(0.5)) * bin_h / A(grid_h); }
    __device__ __forceinline__ A sample_w(int ix) const { return x + (A(ix) + A(0.5)) * bin_w / A(grid_w); }

    // f(ClampedCorners) for every sample inside RoIAlign's box, row by row.
    template <typename F>
    __device__ __forceinline__ void for_each_sample(index_t height, index_t width, F f) const {
        for (int iy = 0; iy < grid_h; ++iy) {
            const A h = sample_h(iy);
            for (int ix = 0; ix < grid_w; ++ix) {
                const A w = sample_w(ix);
                if (in_closed_box(h, w, height, width, A(1))) f(ClampedCorners<A>(h, w, height, width));
            }
        }
    }
};

template <typename T>
__global__ void droi_forward(const T* __restrict__ input, const T* __restrict__ rois, const T* __restrict__ offset,
                             const T* __restrict__ mask, int use_offset, int use_mask, DROI_GEOMETRY,
                             T* __restrict__ out) {
    typedef typename acc<T>::type A;
    const index_t bins = (index_t)pooled_h * pooled_w;
    CUDEFORM_LOOP(idx, num_rois * channels * bins) {
        const index_t rc = fast_div(idx, bins), l = idx - rc * bins;
        const index_t r = fast_div(rc, channels), c = rc - r * channels;
        const RoIAlignBin<A> bin(rois, offset, use_offset, r, l, batch, pooled_h, pooled_w, spatial_scale,
                                 sampling_ratio, gamma);
        A sum = A(0);
        if (bin.image >= 0) {
            const T* plane = input + (bin.image * channels + c) * height * width;
            bin.for_each_sample(height, width, [&](const ClampedCorners<A>& s) {
                A v00, v01, v10, v11;
                s.fetch(plane, width, v00, v01, v10, v11);
                sum += s.blend(v00, v01, v10, v11);
            });
            sum /= bin.count;
            if (use_mask) sum *= to_acc(mask[r * bins + l]);
        }
        out[idx] = from_acc<T>(sum);
    }
}

// The rows (or the columns) that two neighbouring samples of a bin touch, each once. Slots 0
// and 1 are the first sample's two neighbours, 2 and 3 the second's; a slot whose row an
// earlier live slot already holds is folded into it (and is no longer live). w is the slot's
// summed blend weight, d the summed derivative of that weight with respect to the sample's
// position (-1 low, +1 high, where the clamped position moves). A bin's samples form a grid and
// a sample is in the box when each coordinate is in its range, so the bin's weight at (y, x) is
// the rows' w(y) times the columns' w(x) (and its derivatives are d(y) w(x), w(y) d(x)): each
// (row slot, column slot) is one corner, read and scattered once for all the samples that share
// it. With the samples taken in increasing position, the live slots' rows increase.
template <typename A>
struct SamplePair {
    int idx[4];
    A w[4], d[4];
    bool live[4];

    // Positions p and, when `two`, q of one axis of size n; RoIAlign's range has margin 1.
    __device__ __forceinline__ SamplePair(A p, A q, bool two, index_t n) {
        if (two && q < p) {
            const A t = p;
            p = q;
            q = t;
        }
        const bool in_p = in_closed_range(p, n, A(1)), in_q = two && in_closed_range(q, n, A(1));
        // Outside the range (NaN included) a position is never used: keep it out of the casts.
        const ClampedAxis<A> a(in_p ? p : A(0), n), b(in_q ? q : A(0), n);
        idx[0] = (int)a.i0; idx[1] = (int)a.i1; idx[2] = (int)b.i0; idx[3] = (int)b.i1;
        w[0] = A(1) - a.l; w[1] = a.l; w[2] = A(1) - b.l; w[3] = b.l;
        d[0] = a.moves ? A(-1) : A(0); d[1] = -d[0];
        d[2] = b.moves ? A(-1) : A(0); d[3] = -d[2];
        live[0] = live[1] = in_p;
        live[2] = live[3] = in_q;
#pragma unroll
        for (int j = 1; j < 4; ++j) {
#pragma unroll
            for (int i = 0; i < j; ++i) {
                if (live[i] && live[j] && idx[i] == idx[j]) {
                    w[i] += w[j];
                    d[i] += d[j];
                    live[j] = false;
                }
            }
        }
    }

    // Whether slots j and k are live and k holds the row (column) after j's. Between two live
    // slots only slot 2 can be dead: slot 1 is dead (with 0 live) only when the first sample is
    // clamped to the last row, and then so is the second, whose slots fold into slot 0.
    __device__ __forceinline__ bool next_to(int j, int k) const {
        return live[j] && live[k] && idx[k] == idx[j] + 1;
    }
};

// One row of a bin's corners in the input gradient: g times each column slot's weight, at
// row_start + column. Neighbouring columns starting at an even element go as one pair.
template <typename A>
__device__ __forceinline__ void scatter_row(const InputGrad<A>& out, const SamplePair<A>& cols, index_t row_start,
                                            A g) {
    // Live slot j, with slot k (j's next live slot, or -1) when that is the next column and j's
    // element is even (the pair 8-byte aligned); whether k was taken.
    const auto put = [&](int j, int k) {
        const index_t i = row_start + cols.idx[j];
        if (k >= 0 && cols.next_to(j, k) && (i & 1) == 0) {
            out.add_pair(i, g * cols.w[j], g * cols.w[k]);
            return true;
        }
        out.add(i, g * cols.w[j]);
        return false;
    };
    bool taken1 = false, taken2 = false, taken3 = false;
    if (cols.live[0]) taken1 = put(0, 1);
    if (cols.live[1] && !taken1) {
        if (cols.live[2]) taken2 = put(1, 2);
        else taken3 = put(1, 3);
    }
    if (cols.live[2] && !taken2) taken3 = put(2, 3);
    if (cols.live[3] && !taken3) put(3, -1);
}

// Every gradient of deform_roi_pool. A block takes 32 consecutive (RoI, bin) items, one per
// lane, and ROI_BWD_CHANNELS channels of them, which its ROI_BWD_WARPS warps split (warp k
// takes the chunk's channels k, k + WARPS, ...): a warp instruction touches 32 neighbouring bins
// of one channel plane, so contiguous grad_output and atomics on nearby pixels, as
// torchvision's roi_align backward. The blocks go chunk by chunk (the chunk is the slow index),
// so the input and the accumulator being touched at any moment are a chunk's planes: 64
// channels of the benchmark's two 100x152 images are 16 MB of float input and uint64
// accumulator, which the L2 holds, where all 256 channels spill it.
// A thread walks its bin's samples two rows by two columns at a time (SamplePair), reading each
// distinct corner once and scattering its input gradient once (neighbouring corners in one
// vector atomic on sm_90), and, with an offset or a mask, sums the bin's offset and mask
// gradients over its channels from the same reads; the warps' sums are added in a fixed order
// through shared memory and written by warp 0 to `partials` (chunks, 3, R * bins), which
// droi_coord_grads reduces in a fixed order.
// grad_input (N, C, H, W) is of type acc<T>::type and must start at zero; in deterministic
// mode `fixed` (same size) and `special` (a word per 16 elements), zeroed, take the
// contributions instead (then roi_pool_fixed_finish). With `scatter` 0 the kernel leaves the
// input gradient alone (droi_gather_input_grad makes it) and only reduces the offset and mask
// sums.
// Launch with ROI_BWD_BLOCK threads per block, one block per (chunk, 32 items). Three blocks
// per SM cap the registers at 80, which the half types and float fit without spilling (double
// spills) as long as the loop over row slots is not unrolled (its slots then sit in local
// memory, in the L1); unrolled, it takes ~106 and one block fewer.
#define ROI_BWD_WARPS 8
#define ROI_BWD_BLOCK (WARP_SIZE * ROI_BWD_WARPS)
#define ROI_BWD_CHANNELS 64
template <typename T>
__global__ void __launch_bounds__(ROI_BWD_BLOCK, 3) droi_backward(
        const T* __restrict__ grad_output, const T* __restrict__ input, const T* __restrict__ rois,
        const T* __restrict__ offset, const T* __restrict__ mask, int use_offset, int use_mask, DROI_GEOMETRY,
        int scatter, int deterministic, const unsigned int* __restrict__ max_abs_bits,
        unsigned long long* __restrict__ fixed,
        unsigned int* __restrict__ special, typename acc<T>::type* __restrict__ grad_input,
        typename acc<T>::type* __restrict__ partials) {
    typedef typename acc<T>::type A;
    __shared__ A partial[3][ROI_BWD_WARPS][WARP_SIZE];
    const index_t bins = (index_t)pooled_h * pooled_w, hw = height * width, items = num_rois * bins;
    const index_t groups = (items + WARP_SIZE - 1) / WARP_SIZE;
    const index_t units = groups * ((channels + ROI_BWD_CHANNELS - 1) / ROI_BWD_CHANNELS);
    const InputGrad<A> out{grad_input, fixed, special, deterministic,
                           deterministic ? fixed_point_scale(*max_abs_bits, items) : 0.0};
    const bool coords = use_offset || use_mask;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    for (index_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
        const index_t chunk = unit / groups, item = (unit - chunk * groups) * WARP_SIZE + lane;
        const index_t c_end = min(channels, (chunk + 1) * ROI_BWD_CHANNELS);
        A sum_h = A(0), sum_w = A(0), sum_v = A(0);
        if (item < items) {
            const index_t r = fast_div(item, bins), l = item - r * bins;
            const RoIAlignBin<A> bin(rois, offset, use_offset, r, l, batch, pooled_h, pooled_w, spatial_scale,
                                     sampling_ratio, gamma);
            const A m = use_mask ? to_acc(mask[item]) : A(1);
            // A RoI outside the batch has no planes.
            const index_t c_first = bin.image >= 0 ? chunk * ROI_BWD_CHANNELS + warp : c_end;
            for (int iy = 0; iy < bin.grid_h; iy += 2) {
                const SamplePair<A> rows(bin.sample_h(iy), bin.sample_h(iy + 1), iy + 1 < bin.grid_h, height);
                for (int ix = 0; ix < bin.grid_w; ix += 2) {
                    const SamplePair<A> cols(bin.sample_w(ix), bin.sample_w(ix + 1), ix + 1 < bin.grid_w, width);
                    for (index_t c = c_first; c < c_end; c += ROI_BWD_WARPS) {
                        const A go = to_acc(grad_output[(r * channels + c) * bins + l]);
                        A gv = go / bin.count;
                        if (use_mask) gv *= m;
                        const index_t plane = (bin.image * channels + c) * hw;
                        A d_h = A(0), d_w = A(0), v = A(0);
                        // Row slots one at a time (not unrolled: see the launch bounds).
#pragma unroll 1
                        for (int i = 0; i < 4; ++i) {
                            if (!rows.live[i]) continue;
                            const index_t row_start = plane + rows.idx[i] * width;
                            // The row's corners times the columns' w and d. The loads go out
                            // before the atomics, which do not wait for them.
                            A row_w = A(0), row_d = A(0);
                            if (coords) {
#pragma unroll
                                for (int j = 0; j < 4; ++j) {
                                    if (!cols.live[j]) continue;
                                    const A x = to_acc(input[row_start + cols.idx[j]]);
                                    row_w += cols.w[j] * x;
                                    row_d += cols.d[j] * x;
                                }
                            }
                            if (scatter) scatter_row(out, cols, row_start, rows.w[i] * gv);
                            d_h += rows.d[i] * row_w;
                            d_w += rows.w[i] * row_d;
                            v += rows.w[i] * row_w;
                        }
                        sum_h += go * d_h;
                        sum_w += go * d_w;
                        sum_v += go * v;
                    }
                }
            }
        }
        if (!coords) continue;  // uniform over the grid: no thread waits at the barriers below
        partial[0][warp][lane] = sum_h;
        partial[1][warp][lane] = sum_w;
        partial[2][warp][lane] = sum_v;
        __syncthreads();
        if (warp == 0 && item < items) {
            for (int k = 1; k < ROI_BWD_WARPS; ++k) {
                sum_h += partial[0][k][lane];
                sum_w += partial[1][k][lane];
                sum_v += partial[2][k][lane];
            }
            partials[(chunk * 3) * items + item] = sum_h;
            partials[(chunk * 3 + 1) * items + item] = sum_w;
            partials[(chunk * 3 + 2) * items + item] = sum_v;
        }
        __syncthreads();
    }
}

// deform_roi_pool's offset and mask gradients from droi_backward's per-chunk sums over
// channels, added chunk by chunk; one thread per (RoI, bin).
template <typename T>
__global__ void droi_coord_grads(const typename acc<T>::type* __restrict__ partials, index_t chunks,
                                 const T* __restrict__ rois, const T* __restrict__ offset, const T* __restrict__ mask,
                                 int use_offset, int use_mask, DROI_GEOMETRY, T* __restrict__ grad_offset,
                                 T* __restrict__ grad_mask) {
    typedef typename acc<T>::type A;
    const index_t bins = (index_t)pooled_h * pooled_w, items = num_rois * bins;
    CUDEFORM_LOOP(item, items) {
        A sum_h = A(0), sum_w = A(0), sum_v = A(0);
        for (index_t chunk = 0; chunk < chunks; ++chunk) {
            sum_h += partials[(chunk * 3) * items + item];
            sum_w += partials[(chunk * 3 + 1) * items + item];
            sum_v += partials[(chunk * 3 + 2) * items + item];
        }
        const index_t r = fast_div(item, bins), l = item - r * bins;
        const RoIAlignBin<A> bin(rois, offset, use_offset, r, l, batch, pooled_h, pooled_w, spatial_scale,
                                 sampling_ratio, gamma);
        const A per_sample = (use_mask ? to_acc(mask[item]) : A(1)) / bin.count;
        if (use_offset) {
            grad_offset[r * 2 * bins + l] = from_acc<T>(bin.step_w * per_sample * sum_w);
            grad_offset[(r * 2 + 1) * bins + l] = from_acc<T>(bin.step_h * per_sample * sum_h);
        }
        if (use_mask) grad_mask[item] = from_acc<T>(sum_v / bin.count);
    }
}

// ---------------------------------------------------------------------------------------------
// deform_roi_pool's deterministic input gradient, gathered. With sampling_ratio > 0 every bin
// has the same number of samples, so the host sizes a list of (pixel, RoI bin, coefficient)
// entries without reading the device: droi_list_corners writes it, the host sorts it by pixel,
// droi_sorted_entries finds each pixel's run and droi_gather_input_grad sums every run in its
// sorted order, each element by one thread and written once: no atomics, no fixed point, and
// the result does not depend on the launch or on the GPU.
// ---------------------------------------------------------------------------------------------

// Pass 1: one thread per (RoI, bin, pair of sample rows, pair of sample columns) takes
// droi_backward's SamplePair corners (the same clamping, coincident-corner merging and box
// rules) and writes a `slots` x `slots` block of entries: slots is 4, or 2 when sampling_ratio
// is 1 (one sample per axis: slots 2 and 3 are always dead). Entry e of a live (row slot,
// column slot) corner gets the key (pixel << entry_bits) | e, pixel = (image * H + y) * W + x,
// and the coefficient row weight * column weight * mask / count: its share of each channel's
// grad_output[r, c, l]. Dead entries, and every entry of a RoI outside the batch, get pixel
// N*H*W, which sorts last, and no coefficient. The entry's index in the low bits makes the keys
// distinct, so any sort puts a pixel's entries in one order, that of their indices.
template <typename T>
__global__ void droi_list_corners(const T* __restrict__ rois, const T* __restrict__ offset,
                                  const T* __restrict__ mask, int use_offset, int use_mask, DROI_GEOMETRY, int slots,
                                  int entry_bits, unsigned long long* __restrict__ keys,
                                  typename acc<T>::type* __restrict__ coefs) {
    typedef typename acc<T>::type A;
    const index_t bins = (index_t)pooled_h * pooled_w, pixels = batch * height * width;
    const int pairs = (sampling_ratio + 1) / 2;  // per axis
    CUDEFORM_LOOP(t, num_rois * bins * pairs * pairs) {
        const index_t item = fast_div(t, (index_t)pairs * pairs);
        const int pair = (int)(t - item * pairs * pairs), iy = 2 * (pair / pairs), ix = 2 * (pair % pairs);
        const index_t r = fast_div(item, bins), l = item - r * bins;
        const RoIAlignBin<A> bin(rois, offset, use_offset, r, l, batch, pooled_h, pooled_w, spatial_scale,
                                 sampling_ratio, gamma);
        const A share = (use_mask ? to_acc(mask[item]) : A(1)) / bin.count;
        const SamplePair<A> rows(bin.sample_h(iy), bin.sample_h(iy + 1), iy + 1 < bin.grid_h, height);
        const SamplePair<A> cols(bin.sample_w(ix), bin.sample_w(ix + 1), ix + 1 < bin.grid_w, width);
        // Unrolled to the most slots, so that the SamplePairs stay in registers.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (i >= slots || j >= slots) continue;
                const index_t entry = (t * slots + i) * slots + j;
                const bool live = bin.image >= 0 && rows.live[i] && cols.live[j];
                const index_t pixel = live ? (bin.image * height + rows.idx[i]) * width + cols.idx[j] : pixels;
                keys[entry] = ((unsigned long long)pixel << entry_bits) | (unsigned long long)entry;
                if (live) coefs[entry] = rows.w[i] * cols.w[j] * share;
            }
        }
    }
}

// Pass 2, on the n sorted keys: starts[p] for p in [0, N*H*W], the first entry of pixel p
// (of pixel N*H*W: the first dead entry, or n), by binary search; and the live entries' (RoI,
// bin) items (entry / per_item, per_item entries per bin) and coefficients in sorted order, so
// that pass 4 reads them contiguously. Launch max(n, N*H*W + 1) threads.
template <typename T>
__global__ void droi_sorted_entries(const unsigned long long* __restrict__ keys, index_t n, int entry_bits,
                                    int per_item, const typename acc<T>::type* __restrict__ coefs, index_t pixels,
                                    int* __restrict__ starts, int* __restrict__ items,
                                    typename acc<T>::type* __restrict__ sorted_coefs) {
    const unsigned long long entry_mask = (1ull << entry_bits) - 1;
    CUDEFORM_LOOP(i, n > pixels ? n : pixels + 1) {
        if (i <= pixels) {
            const unsigned long long first = (unsigned long long)i << entry_bits;
            index_t lo = 0, hi = n;
            while (lo < hi) {
                const index_t mid = (lo + hi) / 2;
                if (keys[mid] < first) lo = mid + 1;
                else hi = mid;
            }
            starts[i] = (int)lo;
        }
        if (i < n && (index_t)(keys[i] >> entry_bits) < pixels) {
            const index_t entry = (index_t)(keys[i] & entry_mask);
            items[i] = (int)fast_div(entry, (index_t)per_item);
            sorted_coefs[i] = coefs[entry];
        }
    }
}

// Pass 3: grad_output (R, C, bins) as grad_output_t (R, bins, C), through 32 x 32 tiles in
// shared memory so that both the reads and the writes are coalesced. Launch with
// DROI_GATHER_BLOCK threads per block, one block per tile.
#define DROI_GATHER_WARPS 8
#define DROI_GATHER_BLOCK (WARP_SIZE * DROI_GATHER_WARPS)
template <typename T>
__global__ void __launch_bounds__(DROI_GATHER_BLOCK) droi_transpose_grad_output(
        const T* __restrict__ grad_output, index_t num_rois, index_t channels, index_t bins,
        T* __restrict__ grad_output_t) {
    typedef typename acc<T>::type A;
    __shared__ A tile[WARP_SIZE][WARP_SIZE + 1];  // + 1: the column reads hit 32 banks
    const index_t c_tiles = (channels + WARP_SIZE - 1) / WARP_SIZE, l_tiles = (bins + WARP_SIZE - 1) / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    for (index_t unit = blockIdx.x; unit < num_rois * c_tiles * l_tiles; unit += gridDim.x) {
        const index_t r = unit / (c_tiles * l_tiles), rest = unit - r * c_tiles * l_tiles;
        const index_t c0 = rest / l_tiles * WARP_SIZE, l0 = rest % l_tiles * WARP_SIZE;
        for (int k = warp; k < WARP_SIZE; k += DROI_GATHER_WARPS) {
            if (c0 + k < channels && l0 + lane < bins)
                tile[k][lane] = to_acc(grad_output[(r * channels + c0 + k) * bins + l0 + lane]);
        }
        __syncthreads();
        for (int k = warp; k < WARP_SIZE; k += DROI_GATHER_WARPS) {
            if (l0 + k < bins && c0 + lane < channels)
                grad_output_t[(r * bins + l0 + k) * channels + c0 + lane] = from_acc<T>(tile[lane][k]);
        }
        __syncthreads();
    }
}

// Pass 4: grad_input[n, c, y, x] = the sum over pixel (n, y, x)'s entries e, in sorted order, of
// coef[e] * grad_output_t[item[e], c], accumulated in acc<T>::type and written once in T. A block
// takes 32 channels of 32 pixels of one row, the channel tile the slowest index, so that the
// blocks running at any moment read one 32-channel column of grad_output_t, which the L2 holds.
// Warp w sums pixels w, w + 8, ..., a lane per channel (coalesced reads of grad_output_t), taking
// the pixel's entries 32 at a time (a lane each, then broadcast by shuffles); the sums go through
// shared memory so that the stores, a lane per pixel, are coalesced too. Launch with
// DROI_GATHER_BLOCK threads per block, one block per (channel tile, image row, 32 pixels).
template <typename T>
__global__ void __launch_bounds__(DROI_GATHER_BLOCK) droi_gather_input_grad(
        const int* __restrict__ starts, const int* __restrict__ items,
        const typename acc<T>::type* __restrict__ coefs, const T* __restrict__ grad_output_t, index_t batch,
        index_t channels, index_t height, index_t width, T* __restrict__ grad_input) {
    typedef typename acc<T>::type A;
    __shared__ A tile[WARP_SIZE][WARP_SIZE + 1];  // [pixel][channel]; + 1 for the column reads
    const index_t x_tiles = (width + WARP_SIZE - 1) / WARP_SIZE, rows = batch * height;
    const index_t units = (channels + WARP_SIZE - 1) / WARP_SIZE * rows * x_tiles;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    for (index_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
        const index_t c_tile = unit / (rows * x_tiles), rest = unit - c_tile * rows * x_tiles;
        const index_t row = rest / x_tiles, x0 = (rest - row * x_tiles) * WARP_SIZE, c0 = c_tile * WARP_SIZE;
        const index_t c = c0 + lane;
        for (int j = warp; j < WARP_SIZE; j += DROI_GATHER_WARPS) {
            A sum = A(0);
            if (x0 + j < width) {  // the same for the whole warp, as the loops below
                const index_t pixel = row * width + x0 + j;
                const int e_end = starts[pixel + 1];
                for (int e0 = starts[pixel]; e0 < e_end; e0 += WARP_SIZE) {
                    const int mine = e0 + lane;
                    const int item = mine < e_end ? items[mine] : 0;
                    const A coef = mine < e_end ? coefs[mine] : A(0);
                    const int n_e = min(WARP_SIZE, e_end - e0);
                    for (int k = 0; k < n_e; ++k) {
                        const index_t it = __shfl_sync(0xffffffffu, item, k);
                        const A w = __shfl_sync(0xffffffffu, coef, k);
                        if (c < channels) sum += w * to_acc(grad_output_t[it * channels + c]);
                    }
                }
            }
            tile[j][lane] = sum;
        }
        __syncthreads();
        const index_t image = row / height, y = row - image * height;
        for (int k = warp; k < WARP_SIZE; k += DROI_GATHER_WARPS) {
            if (c0 + k < channels && x0 + lane < width)
                grad_input[((image * channels + c0 + k) * height + y) * width + x0 + lane] = from_acc<T>(tile[lane][k]);
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// deform_psroi_pool (SPEC.md section 3)
// ---------------------------------------------------------------------------------------------

// The non-array arguments of every deform_psroi_pool kernel, in this order (see the host).
// Without an offset the host passes num_classes = 1 and part_size = pooled_size.
#define DPSROI_GEOMETRY                                                                          \
    index_t num_rois, index_t batch, index_t channels, index_t height, index_t width,          \
    int output_dim, int pooled, int group_size, int part_size, int sample_per_part,             \
    int num_classes, typename acc<T>::type spatial_scale, typename acc<T>::type trans_std

// One RoI's geometry, in MSRA's order of operations. round() rounds halves away from zero.
template <typename A>
struct PSRoIBox {
    index_t image;  // -1: the RoI pools zeros
    A start_h, start_w, roi_h, roi_w, bin_h, bin_w, sub_h, sub_w;

    template <typename T>
    __device__ __forceinline__ PSRoIBox(const T* roi, index_t batch, int pooled, int sample_per_part,
                                        A spatial_scale) {
        image = roi_image(to_acc(roi[0]), batch);
        start_w = mul_add_unfused(round(to_acc(roi[1])), spatial_scale, A(-0.5));
        start_h = mul_add_unfused(round(to_acc(roi[2])), spatial_scale, A(-0.5));
        const A end_w = mul_add_unfused(round(to_acc(roi[3])) + A(1), spatial_scale, A(-0.5));
        const A end_h = mul_add_unfused(round(to_acc(roi[4])) + A(1), spatial_scale, A(-0.5));
        roi_w = end_w - start_w > A(0.1) ? end_w - start_w : A(0.1);
        roi_h = end_h - start_h > A(0.1) ? end_h - start_h : A(0.1);
        bin_h = roi_h / A(pooled);
        bin_w = roi_w / A(pooled);
        sub_h = bin_h / A(sample_per_part);
        sub_w = bin_w / A(sample_per_part);
    }

    // The first sample of bin (p, q), moved by the (already trans_std-scaled) offset.
    __device__ __forceinline__ A first_h(int p, A trans_y) const {
        return mul_add_unfused(trans_y, roi_h, mul_add_unfused(A(p), bin_h, start_h));
    }
    __device__ __forceinline__ A first_w(int q, A trans_x) const {
        return mul_add_unfused(trans_x, roi_w, mul_add_unfused(A(q), bin_w, start_w));
    }

    // f(ClampedCorners) for every sample of the bin whose first sample is (h0, w0) inside MSRA's
    // box [-0.5, H - 0.5] x [-0.5, W - 0.5], row by row.
    template <typename F>
    __device__ __forceinline__ void for_each_sample(A h0, A w0, int n, index_t height, index_t width, F f) const {
        for (int ih = 0; ih < n; ++ih) {
            const A h = mul_add_unfused(A(ih), sub_h, h0);
            for (int iw = 0; iw < n; ++iw) {
                const A w = mul_add_unfused(A(iw), sub_w, w0);
                if (in_closed_box(h, w, height, width, A(0.5))) f(ClampedCorners<A>(h, w, height, width));
            }
        }
    }
};

// The input channel that bin (p, q) of output channel ctop reads.
__device__ __forceinline__ index_t psroi_channel(int ctop, int p, int q, int group_size, int pooled) {
    return ((index_t)ctop * group_size + p * group_size / pooled) * group_size + q * group_size / pooled;
}

// The offset of class `cls` at part cell `cell` of RoI r, times trans_std; 0 without offset.
template <typename T, typename A>
__device__ __forceinline__ void psroi_trans(const T* offset, int use_offset, index_t r, index_t cls, int num_classes,
                                            int part_size, index_t cell, A trans_std, A& trans_x, A& trans_y) {
    const index_t cells = (index_t)part_size * part_size;
    const index_t base = (r * num_classes + cls) * 2 * cells + cell;
    trans_x = use_offset ? to_acc(offset[base]) * trans_std : A(0);
    trans_y = use_offset ? to_acc(offset[base + cells]) * trans_std : A(0);
}

// The number of samples of a bin inside MSRA's box [-0.5, H - 0.5] x [-0.5, W - 0.5].
template <typename A>
__device__ __forceinline__ int psroi_count(A h0, A w0, A sub_h, A sub_w, int n, index_t height, index_t width) {
    int count = 0;
    for (int ih = 0; ih < n; ++ih)
        for (int iw = 0; iw < n; ++iw)
            count += in_closed_box(mul_add_unfused(A(ih), sub_h, h0), mul_add_unfused(A(iw), sub_w, w0), height,
                                   width, A(0.5));
    return count;
}

// The number of bins p (of `pooled`) with floor(p * parts / pooled) == part, and the first of
// them, ceil(part * pooled / parts): the bins of one row (column) of part or group cells.
__device__ __forceinline__ int bins_of_part(int part, int parts, int pooled, int& first) {
    first = (part * pooled + parts - 1) / parts;
    return max(min(((part + 1) * pooled + parts - 1) / parts, pooled) - first, 0);
}

template <typename T>
__global__ void dpsroi_forward(const T* __restrict__ input, const T* __restrict__ rois, const T* __restrict__ offset,
                               int use_offset, DPSROI_GEOMETRY, T* __restrict__ out) {
    typedef typename acc<T>::type A;
    const index_t bins = (index_t)pooled * pooled;
    const int per_class = output_dim / num_classes;
    CUDEFORM_LOOP(idx, num_rois * output_dim * bins) {
        const index_t l = idx % bins, r = idx / (bins * output_dim);
        const int ctop = (int)((idx / bins) % output_dim), p = (int)(l / pooled), q = (int)(l % pooled);
        const PSRoIBox<A> box(rois + r * 5, batch, pooled, sample_per_part, spatial_scale);
        A sum = A(0);
        int count = 0;
        if (box.image >= 0) {
            A trans_x, trans_y;
            psroi_trans(offset, use_offset, r, ctop / per_class, num_classes, part_size,
                        (index_t)(p * part_size / pooled) * part_size + q * part_size / pooled, trans_std,
                        trans_x, trans_y);
            const A h0 = box.first_h(p, trans_y), w0 = box.first_w(q, trans_x);
            const T* plane = input + (box.image * channels + psroi_channel(ctop, p, q, group_size, pooled))
                                         * height * width;
            box.for_each_sample(h0, w0, sample_per_part, height, width, [&](const ClampedCorners<A>& s) {
                A v00, v01, v10, v11;
                s.fetch(plane, width, v00, v01, v10, v11);
                sum += s.blend(v00, v01, v10, v11);
                ++count;
            });
        }
        out[idx] = from_acc<T>(count ? sum / A(count) : A(0));
    }
}

// The samples of one axis of a bin, at first + i * step for i < n: the number inside MSRA's
// range [-0.5, size - 0.5] and the rows (columns) those touch, [lo, hi].
template <typename A>
__device__ __forceinline__ int psroi_axis_extent(A first, A step, int n, index_t size, index_t& lo, index_t& hi) {
    int valid = 0;
    for (int i = 0; i < n; ++i) {
        const A v = mul_add_unfused(A(i), step, first);
        if (!in_closed_range(v, size, A(0.5))) continue;
        const ClampedAxis<A> axis(v, size);
        lo = valid ? min(lo, axis.i0) : axis.i0;
        hi = valid ? max(hi, axis.i1) : axis.i1;
        ++valid;
    }
    return valid;
}

// The summed weight of row (column) i over the valid samples of one axis of a bin, or -1 when
// none of them touches it (a touched row with weight 0 still passes on an infinite gradient,
// as a scatter would, as NaN).
template <typename A>
__device__ __forceinline__ A psroi_axis_weight(A first, A step, int n, index_t size, index_t i) {
    A weight = A(0);
    bool touched = false;
    for (int k = 0; k < n; ++k) {
        const A v = mul_add_unfused(A(k), step, first);
        if (!in_closed_range(v, size, A(0.5))) continue;
        const ClampedAxis<A> axis(v, size);
        touched |= axis.touches(i);
        weight += axis.weight(i);
    }
    return touched ? weight : A(-1);
}

// deform_psroi_pool's input gradient, gathered: the thread of each pixel writes it once, the sum
// over the bins that sample it in the order of the bins. No atomics and no accumulator to zero
// or convert, and the same sum in both modes: deterministic by construction.
// Input channel (ctop * g + gh) * g + gw is read only by the bins (p, q) of group cell (gh, gw)
// of output channel ctop, whose offsets are those of ctop's class. A block takes one image, one
// group cell, one class, PS_GATHER_CHANNELS of its output channels and one PS_TILE_H x
// PS_TILE_W tile of pixels (a warp per row). It lists the image's bins whose samples can touch
// the tile (the candidates are (RoI, p, q), RoI-major, a block's worth at a time), then, for
// PS_GATHER_BINS listed bins at a time, stores their weights over the tile's rows and columns
// (a bin's weight at (y, x) is separable: its valid samples are the valid rows times the valid
// columns) and their channels' grad_output / count, and every pixel adds its bins' products.
// Launch with PS_GATHER_BLOCK threads per block, one block per (image, cell, class, channel
// chunk, tile). Three blocks per SM cap the registers at 80 (uncapped: 107, two blocks); float
// then spills a few bytes, in the listing, not in the per-pixel sums.
#define PS_TILE_H 8
#define PS_TILE_W WARP_SIZE
#define PS_GATHER_BLOCK (PS_TILE_H * PS_TILE_W)
#define PS_GATHER_BINS 64
#define PS_GATHER_CHANNELS 8
template <typename T>
__global__ void __launch_bounds__(PS_GATHER_BLOCK, 3) dpsroi_input_grad(
        const T* __restrict__ grad_output, const T* __restrict__ rois, const T* __restrict__ offset, int use_offset,
        DPSROI_GEOMETRY, T* __restrict__ grad_input) {
    typedef typename acc<T>::type A;
    struct Bin { A h0, w0, sub_h, sub_w, count; index_t go; };  // go: grad_output index of its ctop 0
    __shared__ Bin listed[PS_GATHER_BLOCK];
    __shared__ A row_w[PS_GATHER_BINS][PS_TILE_H], col_w[PS_GATHER_BINS][PS_TILE_W];
    __shared__ A go_w[PS_GATHER_BINS][PS_GATHER_CHANNELS];
    __shared__ int warp_kept[PS_GATHER_BLOCK / WARP_SIZE];
    const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
    const index_t bins = (index_t)pooled * pooled, hw = height * width;
    const int per_class = output_dim / num_classes;
    const int chunks = (per_class + PS_GATHER_CHANNELS - 1) / PS_GATHER_CHANNELS;
    const index_t tiles_w = (width + PS_TILE_W - 1) / PS_TILE_W, tiles = tiles_w * ((height + PS_TILE_H - 1) / PS_TILE_H);
    const index_t blocks = batch * group_size * group_size * num_classes * chunks * tiles;
    for (index_t b = blockIdx.x; b < blocks; b += gridDim.x) {
        const index_t tile = b % tiles, rest = b / tiles;
        const int chunk = (int)(rest % chunks), cls = (int)(rest / chunks % num_classes);
        const index_t cell = rest / ((index_t)chunks * num_classes) % (group_size * group_size);
        const index_t n = rest / ((index_t)chunks * num_classes * group_size * group_size);
        const int gh = (int)(cell / group_size), gw = (int)(cell % group_size);
        const index_t y_lo = tile / tiles_w * PS_TILE_H, x_lo = tile % tiles_w * PS_TILE_W;
        const index_t y = y_lo + warp, x = x_lo + lane;
        int p_lo, q_lo;
        const int n_p = bins_of_part(gh, group_size, pooled, p_lo), n_q = bins_of_part(gw, group_size, pooled, q_lo);
        const int ctop0 = cls * per_class + chunk * PS_GATHER_CHANNELS;
        const int n_ct = min(PS_GATHER_CHANNELS, per_class - chunk * PS_GATHER_CHANNELS);
        A sums[PS_GATHER_CHANNELS];
#pragma unroll
        for (int j = 0; j < PS_GATHER_CHANNELS; ++j) sums[j] = A(0);
        const index_t candidates = num_rois * n_p * n_q;
        for (index_t first = 0; first < candidates; first += PS_GATHER_BLOCK) {
            // The candidate bins whose samples touch the tile, listed in candidate order.
            const index_t k = first + tid;
            Bin bin;
            bool keep = false;
            if (k < candidates) {
                const index_t r = k / (n_p * n_q);
                const int p = p_lo + (int)(k % (n_p * n_q)) / n_q, q = q_lo + (int)(k % n_q);
                const PSRoIBox<A> box(rois + r * 5, batch, pooled, sample_per_part, spatial_scale);
                if (box.image == n) {
                    A trans_x, trans_y;
                    psroi_trans(offset, use_offset, r, cls, num_classes, part_size,
                                (index_t)(p * part_size / pooled) * part_size + q * part_size / pooled, trans_std,
                                trans_x, trans_y);
                    bin.h0 = box.first_h(p, trans_y);
                    bin.w0 = box.first_w(q, trans_x);
                    bin.sub_h = box.sub_h;
                    bin.sub_w = box.sub_w;
                    index_t top = 0, bottom = 0, left = 0, right = 0;
                    const int rows = psroi_axis_extent(bin.h0, box.sub_h, sample_per_part, height, top, bottom);
                    const int cols = psroi_axis_extent(bin.w0, box.sub_w, sample_per_part, width, left, right);
                    bin.count = A(rows * cols);
                    bin.go = (r * output_dim * pooled + p) * pooled + q;
                    keep = rows > 0 && cols > 0 && top < y_lo + PS_TILE_H && bottom >= y_lo
                        && left < x_lo + PS_TILE_W && right >= x_lo;
                }
            }
            const unsigned kept = __ballot_sync(0xffffffffu, keep);
            if (lane == 0) warp_kept[warp] = __popc(kept);
            __syncthreads();
            int slot = 0, n_listed = 0;
            for (int w = 0; w < PS_GATHER_BLOCK / WARP_SIZE; ++w) {
                slot += w < warp ? warp_kept[w] : 0;
                n_listed += warp_kept[w];
            }
            if (keep) listed[slot + __popc(kept & ((1u << lane) - 1u))] = bin;
            __syncthreads();
            for (int e0 = 0; e0 < n_listed; e0 += PS_GATHER_BINS) {
                const int n_e = min(PS_GATHER_BINS, n_listed - e0);
                for (int t = tid; t < n_e * (PS_TILE_H + PS_TILE_W); t += PS_GATHER_BLOCK) {
                    const int e = t / (PS_TILE_H + PS_TILE_W), i = t % (PS_TILE_H + PS_TILE_W);
                    const Bin& d = listed[e0 + e];
                    if (i < PS_TILE_H)
                        row_w[e][i] = psroi_axis_weight(d.h0, d.sub_h, sample_per_part, height, y_lo + i);
                    else
                        col_w[e][i - PS_TILE_H] = psroi_axis_weight(d.w0, d.sub_w, sample_per_part, width,
                                                                    x_lo + i - PS_TILE_H);
                }
                for (int t = tid; t < n_e * PS_GATHER_CHANNELS; t += PS_GATHER_BLOCK) {
                    const int e = t / PS_GATHER_CHANNELS, j = t % PS_GATHER_CHANNELS;
                    const Bin& d = listed[e0 + e];
                    go_w[e][j] = j < n_ct ? to_acc(grad_output[d.go + (ctop0 + j) * bins]) / d.count : A(0);
                }
                __syncthreads();
                for (int e = 0; e < n_e; ++e) {
                    const A wy = row_w[e][warp], wx = col_w[e][lane];
                    if (wy < A(0) || wx < A(0)) continue;
                    const A weight = wy * wx;
#pragma unroll
                    for (int j = 0; j < PS_GATHER_CHANNELS; ++j) sums[j] += go_w[e][j] * weight;
                }
                __syncthreads();
            }
        }
        if (y < height && x < width) {
            for (int j = 0; j < n_ct; ++j) {
                const index_t c = ((index_t)(ctop0 + j) * group_size + gh) * group_size + gw;
                grad_input[(n * channels + c) * hw + y * width + x] = from_acc<T>(sums[j]);
            }
        }
    }
}

// deform_psroi_pool's offset gradient; launch with WARP_SIZE threads per (RoI, class, part
// cell). The lanes split the cell's (channel, bin) pairs (bins_of_part) and a shuffle
// reduction sums them in a fixed order.
template <typename T>
__global__ void dpsroi_offset_grad(const T* __restrict__ grad_output, const T* __restrict__ input,
                                   const T* __restrict__ rois, const T* __restrict__ offset, DPSROI_GEOMETRY,
                                   T* __restrict__ grad_offset) {
    typedef typename acc<T>::type A;
    const index_t cells = (index_t)part_size * part_size, hw = height * width;
    const int per_class = output_dim / num_classes;
    // The bound is a multiple of WARP_SIZE and so is the stride: a warp's lanes share one item.
    CUDEFORM_LOOP(t, num_rois * num_classes * cells * WARP_SIZE) {
        const index_t item = t / WARP_SIZE, cell = item % cells, r = item / (num_classes * cells);
        const index_t cls = (item / cells) % num_classes;
        const int lane = (int)(t % WARP_SIZE);
        const int row = (int)(cell / part_size), col = (int)(cell % part_size);
        int p_lo, q_lo;
        const int n_p = bins_of_part(row, part_size, pooled, p_lo), n_q = bins_of_part(col, part_size, pooled, q_lo);
        const PSRoIBox<A> box(rois + r * 5, batch, pooled, sample_per_part, spatial_scale);
        A trans_x, trans_y;
        psroi_trans(offset, 1, r, cls, num_classes, part_size, cell, trans_std, trans_x, trans_y);
        A sum_h = A(0), sum_w = A(0);
        if (box.image >= 0) {
            for (int j = lane; j < per_class * n_p * n_q; j += WARP_SIZE) {
                const int ctop = (int)cls * per_class + j / (n_p * n_q);
                const int p = p_lo + (j / n_q) % n_p, q = q_lo + j % n_q;
                const A h0 = box.first_h(p, trans_y), w0 = box.first_w(q, trans_x);
                const int count = psroi_count(h0, w0, box.sub_h, box.sub_w, sample_per_part, height, width);
                if (count == 0) continue;
                const A go = to_acc(grad_output[((r * output_dim + ctop) * pooled + p) * pooled + q]) / A(count);
                const T* plane = input + (box.image * channels + psroi_channel(ctop, p, q, group_size, pooled)) * hw;
                A d_h = A(0), d_w = A(0);
                box.for_each_sample(h0, w0, sample_per_part, height, width, [&](const ClampedCorners<A>& s) {
                    A v00, v01, v10, v11;
                    s.fetch(plane, width, v00, v01, v10, v11);
                    d_h += s.d_h(v00, v01, v10, v11);
                    d_w += s.d_w(v00, v01, v10, v11);
                });
                sum_h += go * d_h;
                sum_w += go * d_w;
            }
        }
        sum_h = warp_sum(sum_h);
        sum_w = warp_sum(sum_w);
        if (lane == 0) {
            const index_t base = (r * num_classes + cls) * 2 * cells + cell;
            grad_offset[base] = from_acc<T>(trans_std * box.roi_w * sum_w);
            grad_offset[base + cells] = from_acc<T>(trans_std * box.roi_h * sum_h);
        }
    }
}
