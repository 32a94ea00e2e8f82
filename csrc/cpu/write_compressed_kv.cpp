// CPU kernel of write_compressed_kv: K entries per batch row, copied from one source position
// (index) or merged over the N positions (weights), written into the slots slot_mapping
// names of a paged cache [num_blocks, block_size, Hkv, D] with any strides, converting to
// the cache dtype. Slot -1 skips an entry. Out-of-range slots and indices are rejected by
// the Python wrapper before the call; here they are skipped, so a call with check=False
// never writes out of bounds.
#include "cpu_capability.h"
#include "float_convert.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace etc_ext {
namespace {

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
  const int64_t* slots;  // [B, K] contiguous
};

// dst[d] = src[d] for d < dim, converted: a memcpy for one dtype and unit strides, else a
// loop that vectorizes in the unit-stride case.
template <typename src_t, typename dst_t>
inline void copy_row(const src_t* __restrict__ src, int64_t src_stride, dst_t* __restrict__ dst,
                     int64_t dst_stride, int64_t dim) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    if (src_stride == 1 && dst_stride == 1) {
      std::memcpy(dst, src, static_cast<size_t>(dim) * sizeof(src_t));
    } else {
      for (int64_t d = 0; d < dim; ++d) dst[d * dst_stride] = src[d * src_stride];
    }
  } else if (src_stride == 1 && dst_stride == 1) {
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) store_acc(dst + d, load_acc(src + d));
  } else {
    for (int64_t d = 0; d < dim; ++d)
      store_acc(dst + d * dst_stride, load_acc(src + d * src_stride));
  }
}

template <typename dst_t, typename acc_t>
inline void store_row(const acc_t* __restrict__ acc, dst_t* __restrict__ dst, int64_t dst_stride,
                      int64_t dim) {
  if (dst_stride == 1) {
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) store_acc(dst + d, acc[d]);
  } else {
    for (int64_t d = 0; d < dim; ++d) store_acc(dst + d * dst_stride, acc[d]);
  }
}

// Entry (b, k) copies position index[b, k] of every kv head; here for the (b, h) pairs
// [begin, end). The rows read from one head's [N, D] slice are then (for sorted indices)
// sequential, which the prefetchers follow; entry-major order jumps between heads on every
// row and ran 3x slower. Runs of entries with consecutive indices going to consecutive
// slots of one block (the ETC pattern: a prefix, then the text after the image) are one
// copy when both sides store their rows contiguously. A template on the instruction set for
// the dtype conversions (cpu_capability.h).
template <typename Isa, typename src_t, typename dst_t>
void write_index_heads(const WriteArgs& a, const src_t* key, const src_t* value, dst_t* key_cache,
                       dst_t* value_cache, const int64_t* index, int64_t begin, int64_t end) {
  const bool rows_contiguous = a.key.s3 == 1 && a.value.s3 == 1 && a.key_cache.s3 == 1 &&
                               a.value_cache.s3 == 1 && a.key.s2 == a.dim &&
                               a.value.s2 == a.dim && a.key_cache.s1 == a.dim &&
                               a.value_cache.s1 == a.dim;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / a.kv_heads, h = bh % a.kv_heads;
    const src_t* kb = key + b * a.key.s0 + h * a.key.s1;
    const src_t* vb = value + b * a.value.s0 + h * a.value.s1;
    const int64_t* slots = a.slots + b * a.entries;
    const int64_t* idx = index + b * a.entries;
    int64_t run = 1;
    for (int64_t k = 0; k < a.entries; k += run) {
      const int64_t slot = slots[k], src = idx[k];
      run = 1;
      if (slot < 0 || slot >= a.num_slots || src < 0 || src >= a.tokens) continue;
      const int64_t block = slot / a.block_size, offset = slot % a.block_size;
      if (rows_contiguous) {
        while (k + run < a.entries && slots[k + run] == slot + run && idx[k + run] == src + run &&
               offset + run < a.block_size && src + run < a.tokens)
          ++run;
      }
      // `run` rows, contiguous on both sides when run > 1.
      copy_row(kb + src * a.key.s2, a.key.s3,
               key_cache + block * a.key_cache.s0 + offset * a.key_cache.s1 + h * a.key_cache.s2,
               a.key_cache.s3, run * a.dim);
      copy_row(vb + src * a.value.s2, a.value.s3,
               value_cache + block * a.value_cache.s0 + offset * a.value_cache.s1 +
                   h * a.value_cache.s2,
               a.value_cache.s3, run * a.dim);
    }
  }
}

template <typename src_t, typename dst_t>
using WriteIndexFn = void (*)(const WriteArgs&, const src_t*, const src_t*, dst_t*, dst_t*, const int64_t*,
                              int64_t, int64_t);
template <typename src_t, typename dst_t>
ETC_EXT_TARGET_BASELINE void write_index_heads_baseline(const WriteArgs& a, const src_t* key, const src_t* value,
                                                        dst_t* key_cache, dst_t* value_cache,
                                                        const int64_t* index, int64_t begin, int64_t end) {
  write_index_heads<IsaBaseline>(a, key, value, key_cache, value_cache, index, begin, end);
}
template <typename src_t, typename dst_t>
ETC_EXT_TARGET_AVX2 void write_index_heads_avx2(const WriteArgs& a, const src_t* key, const src_t* value,
                                                dst_t* key_cache, dst_t* value_cache, const int64_t* index,
                                                int64_t begin, int64_t end) {
  write_index_heads<IsaAvx2>(a, key, value, key_cache, value_cache, index, begin, end);
}
template <typename src_t, typename dst_t>
ETC_EXT_TARGET_AVX512 void write_index_heads_avx512(const WriteArgs& a, const src_t* key, const src_t* value,
                                                    dst_t* key_cache, dst_t* value_cache,
                                                    const int64_t* index, int64_t begin, int64_t end) {
  write_index_heads<IsaAvx512>(a, key, value, key_cache, value_cache, index, begin, end);
}

// The pointers of one layer.
template <typename src_t, typename dst_t>
struct LayerData {
  const src_t* key;
  const src_t* value;
  dst_t* key_cache;
  dst_t* value_cache;
};

// Parallel over (layer, b, h), the entries inside: the layers of a compaction are one loop.
template <typename src_t, typename dst_t>
void write_index_kernel(const WriteArgs& a, const std::vector<LayerData<src_t, dst_t>>& layers,
                        const int64_t* index) {
  const CpuKernels<WriteIndexFn<src_t, dst_t>> kernels{write_index_heads_baseline<src_t, dst_t>,
                                                       write_index_heads_avx2<src_t, dst_t>,
                                                       write_index_heads_avx512<src_t, dst_t>};
  const WriteIndexFn<src_t, dst_t> run = kernels.pick();
  const int64_t heads = a.batch * a.kv_heads;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, a.entries * a.dim));
  at::parallel_for(0, static_cast<int64_t>(layers.size()) * heads, grain, [&](int64_t begin, int64_t end) {
    while (begin < end) {  // the part of [begin, end) in one layer at a time
      const int64_t layer = begin / heads, stop = std::min(end, (layer + 1) * heads);
      const LayerData<src_t, dst_t>& d = layers[layer];
      run(a, d.key, d.value, d.key_cache, d.value_cache, index, begin - layer * heads, stop - layer * heads);
      begin = stop;
    }
  });
}

// Entry (b, k) of kv head h is sum_n weights[b, k, n] * key[b, h, n, :], accumulated in
// fp32 (fp64 for fp64). Parallel over (b, h); per head one GEMM [K, N] x [N, D] on the
// head's keys (then values) converted once to the accumulation type. A per-entry loop of
// row updates converted every source row K times and ran at a third of the eager einsum.
template <typename src_t, typename dst_t>
void write_weights_kernel(const WriteArgs& a, const at::Tensor& key, const at::Tensor& value,
                          dst_t* key_cache, dst_t* value_cache, const at::Tensor& weights) {
  using acc_t = at::opmath_type<src_t>;
  const auto acc_options = key.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor acc_weights = weights.to(acc_options.dtype());  // no copy for fp32 keys
  at::parallel_for(0, a.batch * a.kv_heads, 1, [&](int64_t begin, int64_t end) {
    // Nested ATen calls run single-threaded inside parallel_for.
    at::Tensor rows = at::empty({a.tokens, a.dim}, acc_options);
    at::Tensor merged = at::empty({a.entries, a.dim}, acc_options);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / a.kv_heads, h = bh % a.kv_heads;
      const at::Tensor w = acc_weights.select(0, b);  // [K, N]
      for (const bool is_key : {true, false}) {
        const at::Tensor head = (is_key ? key : value).select(0, b).select(0, h);  // [N, D]
        if constexpr (std::is_same_v<src_t, acc_t>) {
          at::mm_out(merged, w, head);
        } else {
          rows.copy_(head);
          at::mm_out(merged, w, rows);
        }
        const acc_t* out = merged.data_ptr<acc_t>();
        dst_t* cache = is_key ? key_cache : value_cache;
        const Strides4& cs = is_key ? a.key_cache : a.value_cache;
        for (int64_t k = 0; k < a.entries; ++k) {
          const int64_t slot = a.slots[b * a.entries + k];
          if (slot < 0 || slot >= a.num_slots) continue;
          const int64_t block = slot / a.block_size, offset = slot % a.block_size;
          store_row(out + k * a.dim, cache + block * cs.s0 + offset * cs.s1 + h * cs.s2, cs.s3,
                    a.dim);
        }
      }
    }
  });
}

}  // namespace

// Both ops (write_compressed_kv is one layer): checked by csrc/torch_bindings.cpp; the layers share
// one layout, so one WriteArgs describes them all.
void write_compressed_kv_layers_cpu(at::TensorList key_caches, at::TensorList value_caches,
                                    at::TensorList keys, at::TensorList values, const at::Tensor& slot_mapping,
                                    const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& index) {
  const at::Tensor& key = keys[0];
  const at::Tensor& key_cache = key_caches[0];
  TORCH_INTERNAL_ASSERT(key.device().is_cpu());
  const at::Tensor slots = slot_mapping.contiguous();
  WriteArgs args{key.size(0), key.size(1), key.size(2), key.size(3), slot_mapping.size(1),
                 key_cache.size(1), key_cache.size(0) * key_cache.size(1), strides_of(key),
                 strides_of(values[0]), strides_of(key_cache), strides_of(value_caches[0]),
                 slots.data_ptr<int64_t>()};
  if (args.batch * args.entries == 0 || args.kv_heads * args.dim == 0) return;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(),
                                  "write_compressed_kv_cpu", [&] {
    using src_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key_cache.scalar_type(),
                                    "write_compressed_kv_cpu_cache", [&] {
      using dst_t = scalar_t;
      if (index.has_value()) {
        std::vector<LayerData<src_t, dst_t>> layers;
        for (size_t l = 0; l < keys.size(); ++l) {
          layers.push_back({keys[l].data_ptr<src_t>(), values[l].data_ptr<src_t>(),
                            key_caches[l].data_ptr<dst_t>(), value_caches[l].data_ptr<dst_t>()});
        }
        const at::Tensor idx = index->contiguous();
        write_index_kernel<src_t, dst_t>(args, layers, idx.data_ptr<int64_t>());
      } else {
        // Each layer's merge is GEMMs parallel over (b, h) already.
        for (size_t l = 0; l < keys.size(); ++l) {
          write_weights_kernel<src_t, dst_t>(args, keys[l], values[l], key_caches[l].data_ptr<dst_t>(),
                                             value_caches[l].data_ptr<dst_t>(), *weights);
        }
      }
    });
  });
}

}  // namespace etc_ext
