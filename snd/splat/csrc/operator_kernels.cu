// snd's two CUDA kernels for the transfer-operator builder (snd.splat.kernels; the math is snd.splat.operator's).
//
// Both walk pixels front to back with the rules of gsplat's forward and index kernels (rasterize_to_pixels_3dgs_fwd,
// rasterize_to_indices_3dgs): the same 16x16 tiles and depth-sorted lists, sigma as gsplat computes it,
// alpha = min(0.999, opacity * __expf(-sigma)), Gaussians with sigma < 0 or alpha < 1/255 skipped, and a pixel done
// before the Gaussian that would take its float32 transmittance T to <= 1e-4.
//
// 1. slot_adjoint: the render's adjoint for a field with one non-zero channel per pixel,
//    out[g, slot(q)] += w(q, g) * value(q) over every pixel q with slot(q) >= 0, w(q, g) = alpha_g(q) T_g(q).
//    Why not gsplat's backward kernel with a K-channel field (the path with SND_SLOT_ADJOINT=off): that kernel works
//    on every channel of every (pixel, Gaussian) pair, K times the work for a field whose pixels each have one
//    channel set, and it recovers T by division from the final alpha. Here each thread walks its pixel (T as the
//    forward pass has it), pixels outside every slot are done at once, and the lanes of a warp that hit the same
//    Gaussian in the same slot are summed with shuffles before one atomic add.
//
// 2. direct_rows: the direct part of the operators, one block per (job, target patch). Its 4 warps walk the
//    patch's 4 downsampling tap pixels; every contributing Gaussian's weight (float64 transmittance over alphas
//    computed with expf, as snd.splat.contrib recomputes gsplat's list in torch) times the tap's coefficient goes
//    through the Gaussian's 4 upsampling taps into a hash table of context-patch columns in shared memory. The
//    row's non-zero sums are then ranked by (|value| descending, column ascending) and the first row_cap written.
//    Why: the torch path lists every (tap pixel, Gaussian) pair (~9 M per 12 targets on a random-init MVSplat
//    scaffold) and sorts and reduces the list twice; that glue was ~2/3 of the builder's device time on an H100.
//
// Plain CUDA with C entry points (no torch headers): it builds in seconds with nvcc and is called through ctypes
// on torch's current stream.
#include <cstdint>
#include <cuda_runtime.h>

namespace {

constexpr float kAlphaThreshold = 1.f / 255.f;  // gsplat's ALPHA_THRESHOLD
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}

__global__ void slot_adjoint_kernel(const uint32_t I, const int32_t n_isects,
                                    const float2 *__restrict__ means2d,    // [I * G, 2]
                                    const float3 *__restrict__ conics,     // [I * G, 3]
                                    const float *__restrict__ opacities,   // [I * G]
                                    const uint32_t W, const uint32_t H, const uint32_t tile_w, const uint32_t tile_h,
                                    const int32_t *__restrict__ tile_offsets,  // [I, tile_h, tile_w]
                                    const int32_t *__restrict__ flatten_ids,   // [n_isects], into [I * G]
                                    const int32_t *__restrict__ slot,          // [I, H, W], -1: none
                                    const float *__restrict__ value,           // [I, H, W]
                                    const uint32_t K, float *__restrict__ out) {  // [I * G, K], zeroed
    const uint32_t image = blockIdx.x;
    const uint32_t tile = blockIdx.y * tile_w + blockIdx.z;
    const uint32_t i = blockIdx.y * blockDim.y + threadIdx.y;
    const uint32_t j = blockIdx.z * blockDim.x + threadIdx.x;
    const uint32_t tr = threadIdx.y * blockDim.x + threadIdx.x;
    const uint32_t lane = tr & 31u;
    const int32_t block_size = static_cast<int32_t>(blockDim.x * blockDim.y);

    const bool inside = i < H && j < W;
    int32_t s = -1;
    float y = 0.f;
    if (inside) {
        const size_t pix = (static_cast<size_t>(image) * H + i) * W + j;
        s = slot[pix];
        y = value[pix];
    }
    // a pixel outside every slot adds nothing; its transmittance is nobody's business
    bool done = !inside || s < 0 || y == 0.f;

    tile_offsets += static_cast<size_t>(image) * tile_h * tile_w;
    const int32_t start = tile_offsets[tile];
    const int32_t end = (image == I - 1 && tile == tile_w * tile_h - 1) ? n_isects : tile_offsets[tile + 1];

    extern __shared__ float4 smem[];  // float4 for alignment
    int32_t *id_b = reinterpret_cast<int32_t *>(smem);
    float3 *xyo_b = reinterpret_cast<float3 *>(id_b + block_size);
    float3 *con_b = xyo_b + block_size;

    const float px = static_cast<float>(j) + 0.5f;
    const float py = static_cast<float>(i) + 0.5f;
    float T = 1.f;
    for (int32_t b0 = start; b0 < end; b0 += block_size) {
        // every thread is past the previous batch before the shared arrays are refilled; all done: stop
        if (__syncthreads_count(done) >= block_size) break;
        const int32_t idx = b0 + static_cast<int32_t>(tr);
        if (idx < end) {
            const int32_t g = flatten_ids[idx];
            id_b[tr] = g;
            const float2 xy = means2d[g];
            xyo_b[tr] = make_float3(xy.x, xy.y, opacities[g]);
            con_b[tr] = conics[g];
        }
        __syncthreads();
        const int32_t n = min(block_size, end - b0);
        if (__all_sync(kFull, done)) continue;  // warp-uniform: this warp's pixels are all done
        for (int32_t t = 0; t < n; ++t) {
            float c = 0.f;
            if (!done) {
                const float3 con = con_b[t];
                const float3 xyo = xyo_b[t];
                const float dx = xyo.x - px, dy = xyo.y - py;
                const float sigma = 0.5f * (con.x * dx * dx + con.z * dy * dy) + con.y * dx * dy;
                const float alpha = fminf(0.999f, xyo.z * __expf(-sigma));
                if (sigma >= 0.f && alpha >= kAlphaThreshold) {
                    const float next_T = T * (1.f - alpha);
                    if (next_T <= 1e-4f) {
                        done = true;  // exclusive, as in the forward kernel
                    } else {
                        c = alpha * T * y;
                        T = next_T;
                    }
                }
            }
            unsigned todo = __ballot_sync(kFull, c != 0.f);
            if (todo == 0u) {
                if (__all_sync(kFull, done)) break;
                continue;
            }
            const int32_t g = id_b[t];
            while (todo) {  // one group of lanes per slot present in this warp (usually one)
                const int leader = __ffs(todo) - 1;
                const int32_t ls = __shfl_sync(kFull, s, leader);
                const bool mine = c != 0.f && s == ls;
                const unsigned group = __ballot_sync(kFull, mine);
                const float sum = warp_sum(mine ? c : 0.f);
                if (static_cast<int>(lane) == leader) atomicAdd(out + static_cast<size_t>(g) * K + ls, sum);
                todo &= ~group;
            }
        }
    }
}


constexpr int kRowWarps = 4;  // one warp per downsampling tap pixel of the patch
constexpr int32_t kEmpty = -1;

__device__ __forceinline__ uint32_t hash_col(int32_t c, uint32_t mask) {
    return (static_cast<uint32_t>(c) * 2654435761u) & mask;
}

// adds x to the column c of the row's table; false when the table is full (the caller reports an overflow)
__device__ __forceinline__ bool table_add(int32_t *keys, double *vals, uint32_t mask, int32_t c, double x) {
    uint32_t h = hash_col(c, mask);
    for (uint32_t probe = 0; probe <= mask; ++probe) {
        const int32_t k = atomicCAS(keys + h, kEmpty, c);
        if (k == kEmpty || k == c) {
            atomicAdd(vals + h, x);
            return true;
        }
        h = (h + 1u) & mask;
    }
    return false;
}

__global__ void direct_rows_kernel(const uint32_t I, const int32_t n_isects, const uint32_t G,
                                   const float2 *__restrict__ means2d,   // [I * G, 2]
                                   const float3 *__restrict__ conics,    // [I * G, 3]
                                   const float *__restrict__ opacities,  // [I * G]
                                   const uint32_t W, const uint32_t H, const uint32_t tile_size,
                                   const uint32_t tile_w, const uint32_t tile_h,
                                   const int32_t *__restrict__ tile_offsets,  // [I, tile_h, tile_w]
                                   const int32_t *__restrict__ flatten_ids,   // [n_isects], into [I * G]
                                   const uint32_t P,
                                   const int32_t *__restrict__ tap_pix,  // [4, P]: pixel y * W + x of each tap
                                   const double *__restrict__ tap_coef,  // [I, 4, P]: weight of the tap's pixel
                                   const int32_t *__restrict__ pair,     // [I]: the pair whose taps a job reads
                                   const int64_t *__restrict__ ucols,    // [pairs * G, 4]: context-patch column
                                   const double *__restrict__ uw,        // [pairs * G, 4]: upsampling weight
                                   const uint32_t capacity,              // table slots, a power of 2
                                   const uint32_t row_cap,
                                   int64_t *__restrict__ out_cols,      // [I * P, row_cap], zeroed
                                   double *__restrict__ out_vals,       // [I * P, row_cap], zeroed
                                   int64_t *__restrict__ out_nnz,       // [I * P]
                                   double *__restrict__ out_abs,        // [I * P, 2]: (sum |v|, dropped |v|)
                                   int32_t *__restrict__ overflow) {    // [1]: rows whose table was full
    const uint32_t row = blockIdx.x;  // job * P + patch
    const uint32_t job = row / P, patch = row - job * P;
    const uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const uint32_t mask = capacity - 1u;

    extern __shared__ double shm[];  // vals [capacity] | compacted vals [capacity] | keys | compacted cols
    double *vals = shm;
    double *cvals = vals + capacity;
    int32_t *keys = reinterpret_cast<int32_t *>(cvals + capacity);
    int32_t *ccols = keys + capacity;
    __shared__ int32_t n_kept, full;
    __shared__ double sums[2];
    for (uint32_t k = threadIdx.x; k < capacity; k += blockDim.x) {
        keys[k] = kEmpty;
        vals[k] = 0.0;
    }
    if (threadIdx.x == 0) {
        n_kept = 0;
        full = 0;
        sums[0] = sums[1] = 0.0;
    }
    __syncthreads();

    // this warp's tap pixel, walked front to back (every lane keeps the same T; lane k owns the batch's k-th Gaussian)
    const double coef = tap_coef[(static_cast<size_t>(job) * 4 + warp) * P + patch];
    if (coef != 0.0) {
        const int32_t q = tap_pix[warp * P + patch];
        const uint32_t qy = static_cast<uint32_t>(q) / W, qx = static_cast<uint32_t>(q) - qy * W;
        const float px = static_cast<float>(qx) + 0.5f, py = static_cast<float>(qy) + 0.5f;
        const uint32_t tile = (qy / tile_size) * tile_w + qx / tile_size;
        const int32_t *offs = tile_offsets + static_cast<size_t>(job) * tile_h * tile_w;
        const int32_t start = offs[tile];
        const int32_t end = (job == I - 1 && tile == tile_w * tile_h - 1) ? n_isects : offs[tile + 1];
        const size_t prow = static_cast<size_t>(pair[job]) * G;
        float T = 1.f;
        double T64 = 1.0;
        bool done = false;
        for (int32_t b0 = start; b0 < end && !done; b0 += 32) {
            const int32_t idx = b0 + static_cast<int32_t>(lane);
            bool hit = false;
            float a_mem = 0.f, a_w = 0.f;
            int32_t g = 0;
            if (idx < end) {
                g = flatten_ids[idx];
                const float2 xy = means2d[g];
                const float3 con = conics[g];
                const float op = opacities[g];
                const float dx = xy.x - px, dy = xy.y - py;
                const float sigma = 0.5f * (con.x * dx * dx + con.z * dy * dy) + con.y * dx * dy;
                a_mem = fminf(0.999f, op * __expf(-sigma));
                a_w = fminf(0.999f, op * expf(-sigma));
                hit = sigma >= 0.f && a_mem >= kAlphaThreshold;
            }
            // the transmittance in list order: lane k's T is the product over the hits before it
            unsigned hits = __ballot_sync(kFull, hit);
            double my_T64 = 0.0;
            bool mine = false;
            const int32_t n = min(32, end - b0);
            for (int32_t k = 0; k < n; ++k) {
                if (!((hits >> k) & 1u)) continue;
                const float am = __shfl_sync(kFull, a_mem, k);
                const float aw = __shfl_sync(kFull, a_w, k);
                const float next_T = T * (1.f - am);
                if (next_T <= 1e-4f) {
                    done = true;  // exclusive, as in gsplat's kernels
                    break;
                }
                if (static_cast<int32_t>(lane) == k) {
                    my_T64 = T64;
                    mine = true;
                }
                T = next_T;
                T64 *= 1.0 - static_cast<double>(aw);
            }
            if (mine) {
                const double share = static_cast<double>(a_w) * my_T64 * coef;
                const size_t gr = (prow + (static_cast<uint32_t>(g) - job * G)) * 4;
#pragma unroll
                for (int t = 0; t < 4; ++t) {
                    const double x = share * uw[gr + t];
                    if (x != 0.0 && !table_add(keys, vals, mask, static_cast<int32_t>(ucols[gr + t]), x)) full = 1;
                }
            }
        }
    }
    __syncthreads();
    if (full) {  // block-uniform: the row is left empty and counted; the caller rebuilds with a larger table
        if (threadIdx.x == 0) atomicAdd(overflow, 1);
        return;
    }
    // compact the non-zero sums (their order does not matter: ranks come from values and columns)
    for (uint32_t k = threadIdx.x; k < capacity; k += blockDim.x) {
        if (keys[k] != kEmpty && vals[k] != 0.0) {
            const int32_t at = atomicAdd(&n_kept, 1);
            ccols[at] = keys[k];
            cvals[at] = vals[k];
        }
    }
    __syncthreads();
    const int32_t n = n_kept;
    double tot = 0.0, drop = 0.0;
    const size_t base = static_cast<size_t>(row) * row_cap;
    for (int32_t e = threadIdx.x; e < n; e += blockDim.x) {
        const double a = fabs(cvals[e]);
        const int32_t c = ccols[e];
        uint32_t rank = 0;
        for (int32_t f = 0; f < n; ++f) {
            const double b = fabs(cvals[f]);
            rank += (b > a) || (b == a && ccols[f] < c);
        }
        tot += a;
        if (rank < row_cap) {
            out_cols[base + rank] = c;
            out_vals[base + rank] = cvals[e];
        } else {
            drop += a;
        }
    }
    atomicAdd(&sums[0], tot);
    atomicAdd(&sums[1], drop);
    __syncthreads();
    if (threadIdx.x == 0) {
        out_nnz[row] = n;
        out_abs[2 * row] = sums[0];
        out_abs[2 * row + 1] = sums[1];
    }
}

}  // namespace

extern "C" int snd_slot_adjoint(int device, uint32_t I, int32_t n_isects, const void *means2d, const void *conics,
                                const void *opacities, uint32_t W, uint32_t H, uint32_t tile_size, uint32_t tile_w,
                                uint32_t tile_h, const void *tile_offsets, const void *flatten_ids, const void *slot,
                                const void *value, uint32_t K, void *out, void *stream) {
    if (I == 0 || tile_w == 0 || tile_h == 0) return 0;
    // this library has its own (static) CUDA runtime: its current device is not torch's
    const cudaError_t set = cudaSetDevice(device);
    if (set != cudaSuccess) return static_cast<int>(set);
    if (tile_size * tile_size % 32 != 0 || tile_size * tile_size > 1024) return static_cast<int>(cudaErrorInvalidValue);
    const dim3 threads(tile_size, tile_size, 1);
    const dim3 grid(I, tile_h, tile_w);
    const size_t shmem = static_cast<size_t>(tile_size) * tile_size * (sizeof(int32_t) + 2 * sizeof(float3)) + 16;
    slot_adjoint_kernel<<<grid, threads, shmem, static_cast<cudaStream_t>(stream)>>>(
        I, n_isects, static_cast<const float2 *>(means2d), static_cast<const float3 *>(conics),
        static_cast<const float *>(opacities), W, H, tile_w, tile_h, static_cast<const int32_t *>(tile_offsets),
        static_cast<const int32_t *>(flatten_ids), static_cast<const int32_t *>(slot),
        static_cast<const float *>(value), K, static_cast<float *>(out));
    return static_cast<int>(cudaGetLastError());
}

extern "C" int snd_direct_rows(int device, uint32_t I, int32_t n_isects, uint32_t G, const void *means2d,
                               const void *conics, const void *opacities, uint32_t W, uint32_t H, uint32_t tile_size,
                               uint32_t tile_w, uint32_t tile_h, const void *tile_offsets, const void *flatten_ids,
                               uint32_t P, const void *tap_pix, const void *tap_coef, const void *pair,
                               const void *ucols, const void *uw, uint32_t capacity, uint32_t row_cap, void *out_cols,
                               void *out_vals, void *out_nnz, void *out_abs, void *overflow, void *stream) {
    if (I == 0 || P == 0) return 0;
    const cudaError_t set = cudaSetDevice(device);
    if (set != cudaSuccess) return static_cast<int>(set);
    if (capacity == 0 || (capacity & (capacity - 1)) != 0 || tile_w == 0 || tile_h == 0)
        return static_cast<int>(cudaErrorInvalidValue);
    const size_t shmem = static_cast<size_t>(capacity) * 2 * (sizeof(double) + sizeof(int32_t));
    // the tables with the kernel's few static bytes pass the default 48 KiB at 2048 slots: opt in to what they need
    const cudaError_t e = cudaFuncSetAttribute(direct_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(shmem));
    if (e != cudaSuccess) return static_cast<int>(e);
    direct_rows_kernel<<<I * P, kRowWarps * 32, shmem, static_cast<cudaStream_t>(stream)>>>(
        I, n_isects, G, static_cast<const float2 *>(means2d), static_cast<const float3 *>(conics),
        static_cast<const float *>(opacities), W, H, tile_size, tile_w, tile_h,
        static_cast<const int32_t *>(tile_offsets), static_cast<const int32_t *>(flatten_ids), P,
        static_cast<const int32_t *>(tap_pix), static_cast<const double *>(tap_coef),
        static_cast<const int32_t *>(pair), static_cast<const int64_t *>(ucols), static_cast<const double *>(uw),
        capacity, row_cap, static_cast<int64_t *>(out_cols), static_cast<double *>(out_vals),
        static_cast<int64_t *>(out_nnz), static_cast<double *>(out_abs), static_cast<int32_t *>(overflow));
    return static_cast<int>(cudaGetLastError());
}
