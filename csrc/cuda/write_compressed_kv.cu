// CUDA kernels of write_compressed_kv: K entries per batch row, copied from one source
// position (index) or merged over the N positions (weights, fp32 accumulation), written
// into the slots slot_mapping names of a paged cache [num_blocks, block_size, Hkv, D] with
// any strides, converting to the cache dtype. Slot -1 skips an entry. The Python wrapper
// rejects out-of-range slots and indices before the call; here they are skipped, so a call
// with check=False (CUDA graphs) never writes out of bounds.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace etc_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWeightTile = 256;  // weights of one entry staged in shared memory at a time
constexpr int kUnroll = 8;        // source positions loaded together by write_weights_kernel

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct WriteArgs {
  int64_t batch, kv_heads, tokens, dim, entries;
  int64_t block_size, num_slots;
  Strides4 key, value, key_cache, value_cache;
};

// The data pointers of up to kMaxLayers layers, passed by value (2 KiB of the 4 KiB of kernel
// parameters): a launch writes every layer (blockIdx.z) without a table copied to the device,
// so it stays capturable in a CUDA graph. The layers share one WriteArgs (checked).
constexpr int kMaxLayers = 64;
template <typename src_t, typename dst_t>
struct LayerPointers {
  const src_t* key[kMaxLayers];
  const src_t* value[kMaxLayers];
  dst_t* key_cache[kMaxLayers];
  dst_t* value_cache[kMaxLayers];
};

// grid: (B * K, ceil(Hkv * D / kThreads), layers); thread (h, d) of entry (b, k) copies one
// element of key and of value of layer blockIdx.z.
template <typename src_t, typename dst_t>
__global__ void __launch_bounds__(kThreads)
    write_index_kernel(const __grid_constant__ LayerPointers<src_t, dst_t> layers,
                       const int64_t* __restrict__ slots,  // [B, K] contiguous
                       const int64_t* __restrict__ index,  // [B, K] contiguous
                       WriteArgs a) {
  const src_t* __restrict__ key = layers.key[blockIdx.z];
  const src_t* __restrict__ value = layers.value[blockIdx.z];
  dst_t* __restrict__ key_cache = layers.key_cache[blockIdx.z];
  dst_t* __restrict__ value_cache = layers.value_cache[blockIdx.z];
  const int64_t e = blockIdx.x;
  const int64_t hd = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t slot = slots[e], src = index[e];
  if (hd >= a.kv_heads * a.dim || slot < 0 || slot >= a.num_slots || src < 0 ||
      src >= a.tokens)
    return;
  const int64_t b = e / a.entries, h = hd / a.dim, d = hd % a.dim;
  const int64_t block = slot / a.block_size, offset = slot % a.block_size;
  key_cache[block * a.key_cache.s0 + offset * a.key_cache.s1 + h * a.key_cache.s2 +
            d * a.key_cache.s3] = static_cast<dst_t>(static_cast<at::opmath_type<src_t>>(
      key[b * a.key.s0 + h * a.key.s1 + src * a.key.s2 + d * a.key.s3]));
  value_cache[block * a.value_cache.s0 + offset * a.value_cache.s1 + h * a.value_cache.s2 +
              d * a.value_cache.s3] = static_cast<dst_t>(static_cast<at::opmath_type<src_t>>(
      value[b * a.value.s0 + h * a.value.s1 + src * a.value.s2 + d * a.value.s3]));
}

// grid: (B * K, ceil(Hkv * D / kThreads), layers); thread (h, d) of entry (b, k) accumulates
// sum_n weights[b, k, n] * key[b, h, n, d] (and value) of layer blockIdx.z over tiles of
// weights in shared memory.
template <typename src_t, typename dst_t>
__global__ void __launch_bounds__(kThreads)
    write_weights_kernel(const __grid_constant__ LayerPointers<src_t, dst_t> layers,
                         const int64_t* __restrict__ slots,  // [B, K] contiguous
                         const float* __restrict__ weights, Strides4 w_stride, WriteArgs a) {
  using acc_t = at::opmath_type<src_t>;
  const src_t* __restrict__ key = layers.key[blockIdx.z];
  const src_t* __restrict__ value = layers.value[blockIdx.z];
  dst_t* __restrict__ key_cache = layers.key_cache[blockIdx.z];
  dst_t* __restrict__ value_cache = layers.value_cache[blockIdx.z];
  __shared__ float w_tile[kWeightTile];
  const int64_t e = blockIdx.x;
  const int64_t slot = slots[e];
  if (slot < 0 || slot >= a.num_slots) return;  // the whole block leaves together
  const int64_t b = e / a.entries, k = e % a.entries;
  const int64_t hd = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const bool active = hd < a.kv_heads * a.dim;
  const int64_t h = active ? hd / a.dim : 0, d = active ? hd % a.dim : 0;
  const src_t* kp = key + b * a.key.s0 + h * a.key.s1 + d * a.key.s3;
  const src_t* vp = value + b * a.value.s0 + h * a.value.s1 + d * a.value.s3;
  const float* wp = weights + b * w_stride.s0 + k * w_stride.s1;
  acc_t acc_k = 0, acc_v = 0;
  for (int64_t n0 = 0; n0 < a.tokens; n0 += kWeightTile) {
    const int64_t count = min(int64_t(kWeightTile), a.tokens - n0);
    __syncthreads();  // the previous tile is fully read
    if (threadIdx.x < count) w_tile[threadIdx.x] = wp[(n0 + threadIdx.x) * w_stride.s2];
    __syncthreads();
    if (!active) continue;
    // kUnroll positions' loads issued before their first use: the loop is latency-bound
    // otherwise (one dependent load pair per position).
    int64_t j = 0;
    for (; j + kUnroll <= count; j += kUnroll) {
      acc_t keys[kUnroll], values[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        keys[u] = static_cast<acc_t>(kp[(n0 + j + u) * a.key.s2]);
        values[u] = static_cast<acc_t>(vp[(n0 + j + u) * a.value.s2]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        acc_k += w_tile[j + u] * keys[u];
        acc_v += w_tile[j + u] * values[u];
      }
    }
    for (; j < count; ++j) {
      acc_k += w_tile[j] * static_cast<acc_t>(kp[(n0 + j) * a.key.s2]);
      acc_v += w_tile[j] * static_cast<acc_t>(vp[(n0 + j) * a.value.s2]);
    }
  }
  if (!active) return;
  const int64_t block = slot / a.block_size, offset = slot % a.block_size;
  key_cache[block * a.key_cache.s0 + offset * a.key_cache.s1 + h * a.key_cache.s2 +
            d * a.key_cache.s3] = static_cast<dst_t>(acc_k);
  value_cache[block * a.value_cache.s0 + offset * a.value_cache.s1 + h * a.value_cache.s2 +
              d * a.value_cache.s3] = static_cast<dst_t>(acc_v);
}


}  // namespace

// Both ops (write_compressed_kv is one layer): checked by csrc/torch_bindings.cpp; the layers share
// one layout, so one WriteArgs describes them all; one
// launch per kMaxLayers layers.
void write_compressed_kv_layers_cuda(at::TensorList key_caches, at::TensorList value_caches,
                                     at::TensorList keys, at::TensorList values, const at::Tensor& slot_mapping,
                                     const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& index) {
  const at::Tensor& key = keys[0];
  const at::Tensor& key_cache = key_caches[0];
  TORCH_INTERNAL_ASSERT(key.is_cuda());
  const c10::cuda::CUDAGuard device_guard(key.device());
  const at::Tensor slots = slot_mapping.contiguous();
  const WriteArgs args{key.size(0), key.size(1), key.size(2), key.size(3),
                       slot_mapping.size(1), key_cache.size(1),
                       key_cache.size(0) * key_cache.size(1), strides_of(key),
                       strides_of(values[0]), strides_of(key_cache), strides_of(value_caches[0])};
  const int64_t entries = args.batch * args.entries, elems = args.kv_heads * args.dim;
  if (entries == 0 || elems == 0) return;
  TORCH_CHECK(entries <= std::numeric_limits<int32_t>::max() && (elems + kThreads - 1) / kThreads <= 65535,
              "write_compressed_kv: too many entries or Hkv * D for one launch (B * K = ",
              entries, ", Hkv * D = ", elems, ")");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t num_layers = static_cast<int64_t>(keys.size());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(),
                                  "write_compressed_kv_cuda", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key_cache.scalar_type(),
                                    "write_compressed_kv_cuda_cache", [&] {
      using dst_t = scalar_t;
      const at::Tensor idx = index.has_value() ? index->contiguous() : at::Tensor();
      for (int64_t first = 0; first < num_layers; first += kMaxLayers) {
        const int64_t count = std::min<int64_t>(kMaxLayers, num_layers - first);
        LayerPointers<src_t, dst_t> layers{};
        for (int64_t l = 0; l < count; ++l) {
          layers.key[l] = keys[first + l].data_ptr<src_t>();
          layers.value[l] = values[first + l].data_ptr<src_t>();
          layers.key_cache[l] = key_caches[first + l].data_ptr<dst_t>();
          layers.value_cache[l] = value_caches[first + l].data_ptr<dst_t>();
        }
        const dim3 grid(entries, (elems + kThreads - 1) / kThreads, count);
        if (index.has_value()) {
          write_index_kernel<src_t, dst_t><<<grid, kThreads, 0, stream>>>(
              layers, slots.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), args);
        } else {
          const Strides4 w_stride{weights->stride(0), weights->stride(1), weights->stride(2), 0};
          write_weights_kernel<src_t, dst_t><<<grid, kThreads, 0, stream>>>(
              layers, slots.data_ptr<int64_t>(), weights->data_ptr<float>(), w_stride, args);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

}  // namespace etc_ext
