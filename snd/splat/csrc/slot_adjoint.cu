// The render's adjoint for a field with one non-zero channel per pixel (snd.splat.slot_adjoint).
//
// out[g, slot(q)] += w(q, g) * value(q) over every pixel q with slot(q) >= 0, where w(q, g) = alpha_g(q) T_g(q) is
// the compositing weight of Gaussian g at pixel q as gsplat's forward kernel (rasterize_to_pixels_3dgs_fwd)
// computes it: the same tiles, front-to-back order, alpha = min(0.999, opacity * exp(-sigma)), Gaussians with
// sigma < 0 or alpha < 1/255 skipped, and a pixel done before the Gaussian that would take T to <= 1e-4.
//
// Why not gsplat's backward kernel with a K-channel field (what the builder did before): that kernel works on
// every channel of every (pixel, Gaussian) pair, K times the work for a field whose pixels each have one channel
// set, and it recovers T by division from the final alpha. Here each thread walks its pixel front to back (T as
// the forward pass has it), pixels outside every slot are done at once, and the lanes of a warp that hit the same
// Gaussian in the same slot are summed with shuffles before one atomic add.
//
// Plain CUDA with a C entry point (no torch headers): it builds in seconds with nvcc and is called through ctypes
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
