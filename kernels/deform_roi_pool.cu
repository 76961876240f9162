// Deformable RoI pooling: deform_roi_pool (mmcv's DeformRoIPool: RoIAlign sampling, optional
// modulation mask) and deform_psroi_pool (MSRA's deformable position-sensitive RoI pooling).
// Host code: cudeform/cuda/deform_roi_pool.py. CPU twin: cudeform/cpu/deform_roi_pool.py.
//
// Forward: one thread per output element, as torchvision's roi_align. deform_roi_pool's backward:
// one kernel whose blocks split the channels of 32 (RoI, bin) items, scattering the input
// gradient with atomics and, with an offset or a mask, reading the same corners to reduce their
// gradients (sums over channels) in shared memory. deform_psroi_pool's backward: one warp per
// (RoI, class, part cell), its lanes splitting the channels (and the cell's bins), scattering
// the input gradient with atomics and reducing the offset gradient with shuffles. One thread
// writes each reduced value, so no address sees more than one write.
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

// Deterministic mode keeps each input-gradient element's finite contributions as a 64-bit
// fixed-point sum (scale from fixed_point_scale) and its non-finite ones as two bits of a
// `special` word (16 elements a word): +inf seen, -inf seen, both for NaN. Both are sums that
// do not depend on the order, and roi_pool_fixed_finish turns them into the gradient in one
// pass, so this mode needs no floating-point accumulator (nor its zeroing and extra passes).
// One input-gradient contribution: a float atomic, or in deterministic mode a fixed-point one.
template <typename A>
__device__ __forceinline__ void scatter(A* grad, unsigned long long* fixed, unsigned int* special, int deterministic,
                                        double scale, index_t i, A v) {
    if (!deterministic) {
        atomic_add(grad + i, v);
    } else if (isfinite(v)) {
        atomicAdd(fixed + i, (unsigned long long)llrint((double)v * scale));
    } else {
        atomicOr(special + (i >> 4), (isnan(v) ? 3u : v > A(0) ? 1u : 2u) << ((i & 15) * 2));
    }
}

// The four corners of a sample, weighted by gv, into the plane starting at `plane`.
template <typename A>
__device__ __forceinline__ void scatter_corners(const ClampedCorners<A>& s, index_t plane, index_t width, A gv,
                                                A* grad, unsigned long long* fixed, unsigned int* special,
                                                int deterministic, double scale) {
    scatter(grad, fixed, special, deterministic, scale, plane + s.y0 * width + s.x0, (A(1) - s.lh) * (A(1) - s.lw) * gv);
    scatter(grad, fixed, special, deterministic, scale, plane + s.y0 * width + s.x1, (A(1) - s.lh) * s.lw * gv);
    scatter(grad, fixed, special, deterministic, scale, plane + s.y1 * width + s.x0, s.lh * (A(1) - s.lw) * gv);
    scatter(grad, fixed, special, deterministic, scale, plane + s.y1 * width + s.x1, s.lh * s.lw * gv);
}

// Deterministic mode, pass 1: the largest finite |grad_output * mask| (R, C, bins). Each bin
// spreads at most that much over the input (its sample weights sum to at most 1), so with
// R * bins terms it bounds every input pixel's sum for fixed_point_scale. Launch few enough
// threads that each reads many elements: the atomics all hit one address, where they queue
// at the L2, so there is one per warp.
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
        if (isfinite(v) && fabs(v) > local) local = fabs(v);
    }
    for (int s = WARP_SIZE / 2; s > 0; s >>= 1) local = fmax(local, __shfl_xor_sync(0xffffffffu, local, s));
    if (threadIdx.x % WARP_SIZE == 0) atomic_max_abs(max_abs_bits, local);
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

// The sampling grid of bin l of RoI r, offset included, in mmcv's order of operations. Every
// deform_roi_pool kernel walks a bin's samples through for_each_sample.
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

    // f(ClampedCorners) for every sample inside RoIAlign's box, row by row. (iy + 0.5 in
    // A: in double it costs three conversions per coordinate, and the value is the same.)
    template <typename F>
    __device__ __forceinline__ void for_each_sample(index_t height, index_t width, F f) const {
        for (int iy = 0; iy < grid_h; ++iy) {
            const A h = y + (A(iy) + A(0.5)) * bin_h / A(grid_h);
            for (int ix = 0; ix < grid_w; ++ix) {
                const A w = x + (A(ix) + A(0.5)) * bin_w / A(grid_w);
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

// Every gradient of deform_roi_pool. A block takes 32 consecutive (RoI, bin) items, one per
// lane, and its ROI_BWD_CHUNKS warps split the channels (warp k takes channels k, k + CHUNKS,
// ...), so a warp instruction touches 32 neighbouring bins of one channel plane: contiguous
// grad_output, and atomics on nearby pixels, as torchvision's roi_align backward. A thread
// scatters its samples' input gradient and, with an offset or a mask, reads the same four
// corners to sum the bin's offset and mask gradients over its channels; the warps' partial
// sums are added in a fixed order through shared memory and written once, by warp 0.
// grad_input (N, C, H, W) is of type acc<T>::type and must start at zero; in deterministic
// mode `fixed` (same size) and `special` (a word per 16 elements), zeroed, take the
// contributions instead (then roi_pool_fixed_finish).
// Launch with ROI_BWD_BLOCK threads per block. 16 warps give the benchmark's 1000 RoIs x 49
// bins ~6 waves on an H100/H200, 16 of its 256 channels per thread. Two blocks per SM cap the
// registers at 64: uncapped, the deterministic and offset paths together take ~90 and one
// block would fit; capped, the half types and float fit without spilling (double spills).
#define ROI_BWD_CHUNKS 16
#define ROI_BWD_BLOCK (WARP_SIZE * ROI_BWD_CHUNKS)
template <typename T>
__global__ void __launch_bounds__(ROI_BWD_BLOCK, 2) droi_backward(
        const T* __restrict__ grad_output, const T* __restrict__ input, const T* __restrict__ rois,
        const T* __restrict__ offset, const T* __restrict__ mask, int use_offset, int use_mask, DROI_GEOMETRY,
        int deterministic, const unsigned int* __restrict__ max_abs_bits, unsigned long long* __restrict__ fixed,
        unsigned int* __restrict__ special, typename acc<T>::type* __restrict__ grad_input, T* __restrict__ grad_offset,
        T* __restrict__ grad_mask) {
    typedef typename acc<T>::type A;
    __shared__ A partial[3][ROI_BWD_CHUNKS][WARP_SIZE];
    const index_t bins = (index_t)pooled_h * pooled_w, hw = height * width, items = num_rois * bins;
    const double scale = deterministic ? fixed_point_scale(*max_abs_bits, items) : 0.0;
    const bool coords = use_offset || use_mask;
    const int lane = threadIdx.x % WARP_SIZE, chunk = threadIdx.x / WARP_SIZE;
    for (index_t first = (index_t)blockIdx.x * WARP_SIZE; first < items; first += (index_t)gridDim.x * WARP_SIZE) {
        const index_t item = first + lane;
        A sum_h = A(0), sum_w = A(0), sum_v = A(0);
        if (item < items) {
            const index_t r = fast_div(item, bins), l = item - r * bins;
            const RoIAlignBin<A> bin(rois, offset, use_offset, r, l, batch, pooled_h, pooled_w, spatial_scale,
                                     sampling_ratio, gamma);
            const A m = use_mask ? to_acc(mask[item]) : A(1);
            const index_t planes = bin.image >= 0 ? channels : 0;  // a RoI outside the batch has none
            for (index_t c = chunk; c < planes; c += ROI_BWD_CHUNKS) {
                const A go = to_acc(grad_output[(r * channels + c) * bins + l]);
                A gv = go / bin.count;
                if (use_mask) gv *= m;
                const index_t plane = (bin.image * channels + c) * hw;
                A d_h = A(0), d_w = A(0), v = A(0);
                bin.for_each_sample(height, width, [&](const ClampedCorners<A>& s) {
                    A v00, v01, v10, v11;
                    // The loads go out before the atomics, which do not wait for them.
                    if (coords) s.fetch(input + plane, width, v00, v01, v10, v11);
                    scatter_corners(s, plane, width, gv, grad_input, fixed, special, deterministic, scale);
                    if (coords) {
                        d_h += s.d_h(v00, v01, v10, v11);
                        d_w += s.d_w(v00, v01, v10, v11);
                        v += s.blend(v00, v01, v10, v11);
                    }
                });
                sum_h += go * d_h;
                sum_w += go * d_w;
                sum_v += go * v;
            }
        }
        if (!coords) continue;  // uniform over the grid: no thread waits at the barriers below
        partial[0][chunk][lane] = sum_h;
        partial[1][chunk][lane] = sum_w;
        partial[2][chunk][lane] = sum_v;
        __syncthreads();
        if (chunk == 0 && item < items) {
            for (int k = 1; k < ROI_BWD_CHUNKS; ++k) {
                sum_h += partial[0][k][lane];
                sum_w += partial[1][k][lane];
                sum_v += partial[2][k][lane];
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
        start_w = round(to_acc(roi[1])) * spatial_scale - A(0.5);
        start_h = round(to_acc(roi[2])) * spatial_scale - A(0.5);
        const A end_w = (round(to_acc(roi[3])) + A(1)) * spatial_scale - A(0.5);
        const A end_h = (round(to_acc(roi[4])) + A(1)) * spatial_scale - A(0.5);
        roi_w = end_w - start_w > A(0.1) ? end_w - start_w : A(0.1);
        roi_h = end_h - start_h > A(0.1) ? end_h - start_h : A(0.1);
        bin_h = roi_h / A(pooled);
        bin_w = roi_w / A(pooled);
        sub_h = bin_h / A(sample_per_part);
        sub_w = bin_w / A(sample_per_part);
    }

    // The first sample of bin (p, q), moved by the (already trans_std-scaled) offset.
    __device__ __forceinline__ A first_h(int p, A trans_y) const { return (A(p) * bin_h + start_h) + trans_y * roi_h; }
    __device__ __forceinline__ A first_w(int q, A trans_x) const { return (A(q) * bin_w + start_w) + trans_x * roi_w; }
};

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
            count += in_closed_box(h0 + A(ih) * sub_h, w0 + A(iw) * sub_w, height, width, A(0.5));
    return count;
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
            const index_t c = ((index_t)ctop * group_size + p * group_size / pooled) * group_size
                            + q * group_size / pooled;
            const T* plane = input + (box.image * channels + c) * height * width;
            for (int ih = 0; ih < sample_per_part; ++ih) {
                const A h = h0 + A(ih) * box.sub_h;
                for (int iw = 0; iw < sample_per_part; ++iw) {
                    const A w = w0 + A(iw) * box.sub_w;
                    if (!in_closed_box(h, w, height, width, A(0.5))) continue;
                    const ClampedCorners<A> s(h, w, height, width);
                    A v00, v01, v10, v11;
                    s.fetch(plane, width, v00, v01, v10, v11);
                    sum += s.blend(v00, v01, v10, v11);
                    ++count;
                }
            }
        }
        out[idx] = from_acc<T>(count ? sum / A(count) : A(0));
    }
}

// Every gradient of deform_psroi_pool; launch with WARP_SIZE threads per (RoI, class, part
// cell). The bins of a cell are the (p, q) with floor(p * part_size / pooled) equal to its row
// (and likewise its column): a range of p starting at ceil(row * pooled / part_size). Every
// (channel, bin) of a RoI belongs to exactly one item, so the items also partition the scatter.
// grad_input, fixed and special as for droi_backward.
template <typename T>
__global__ void dpsroi_backward(const T* __restrict__ grad_output, const T* __restrict__ input,
                                const T* __restrict__ rois, const T* __restrict__ offset, int use_offset,
                                DPSROI_GEOMETRY, int deterministic, const unsigned int* __restrict__ max_abs_bits,
                                unsigned long long* __restrict__ fixed, unsigned int* __restrict__ special,
                                typename acc<T>::type* __restrict__ grad_input, T* __restrict__ grad_offset) {
    typedef typename acc<T>::type A;
    const index_t bins = (index_t)pooled * pooled, cells = (index_t)part_size * part_size, hw = height * width;
    const double scale = deterministic ? fixed_point_scale(*max_abs_bits, num_rois * bins) : 0.0;
    const int per_class = output_dim / num_classes;
    // The bound is a multiple of WARP_SIZE and so is the stride: a warp's lanes share one item.
    CUDEFORM_LOOP(t, num_rois * num_classes * cells * WARP_SIZE) {
        const index_t item = t / WARP_SIZE, cell = item % cells, r = item / (num_classes * cells);
        const index_t cls = (item / cells) % num_classes;
        const int lane = (int)(t % WARP_SIZE);
        const int row = (int)(cell / part_size), col = (int)(cell % part_size);
        const int p_lo = (row * pooled + part_size - 1) / part_size;
        const int p_hi = min(((row + 1) * pooled + part_size - 1) / part_size, pooled);
        const int q_lo = (col * pooled + part_size - 1) / part_size;
        const int q_hi = min(((col + 1) * pooled + part_size - 1) / part_size, pooled);
        const int n_p = max(p_hi - p_lo, 0), n_q = max(q_hi - q_lo, 0);
        const PSRoIBox<A> box(rois + r * 5, batch, pooled, sample_per_part, spatial_scale);
        A trans_x, trans_y;
        psroi_trans(offset, use_offset, r, cls, num_classes, part_size, cell, trans_std, trans_x, trans_y);
        A sum_h = A(0), sum_w = A(0);
        if (box.image >= 0) {
            for (int j = lane; j < per_class * n_p * n_q; j += WARP_SIZE) {
                const int ctop = (int)cls * per_class + j / (n_p * n_q);
                const int p = p_lo + (j / n_q) % n_p, q = q_lo + j % n_q;
                const A h0 = box.first_h(p, trans_y), w0 = box.first_w(q, trans_x);
                const int count = psroi_count(h0, w0, box.sub_h, box.sub_w, sample_per_part, height, width);
                if (count == 0) continue;
                const A go = to_acc(grad_output[((r * output_dim + ctop) * pooled + p) * pooled + q]) / A(count);
                const index_t c = ((index_t)ctop * group_size + p * group_size / pooled) * group_size
                                + q * group_size / pooled;
                const index_t plane = (box.image * channels + c) * hw;
                A d_h = A(0), d_w = A(0);
                for (int ih = 0; ih < sample_per_part; ++ih) {
                    const A h = h0 + A(ih) * box.sub_h;
                    for (int iw = 0; iw < sample_per_part; ++iw) {
                        const A w = w0 + A(iw) * box.sub_w;
                        if (!in_closed_box(h, w, height, width, A(0.5))) continue;
                        const ClampedCorners<A> s(h, w, height, width);
                        scatter_corners(s, plane, width, go, grad_input, fixed, special, deterministic, scale);
                        if (use_offset) {
                            A v00, v01, v10, v11;
                            s.fetch(input + plane, width, v00, v01, v10, v11);
                            d_h += s.d_h(v00, v01, v10, v11);
                            d_w += s.d_w(v00, v01, v10, v11);
                        }
                    }
                }
                sum_h += go * d_h;
                sum_w += go * d_w;
            }
        }
        if (use_offset) {
            sum_h = warp_sum(sum_h);
            sum_w = warp_sum(sum_w);
            if (lane == 0) {
                const index_t base = (r * num_classes + cls) * 2 * cells + cell;
                grad_offset[base] = from_acc<T>(trans_std * box.roi_w * sum_w);
                grad_offset[base + cells] = from_acc<T>(trans_std * box.roi_h * sum_h);
            }
        }
    }
}
