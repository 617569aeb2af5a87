// effroll::int4_mm: y[M, N] (bf16) = x[M, K] (bf16) @ W^T, W group-wise INT4 (AVX2 + FMA, fp32 accumulation).
//
// Layout (built by effroll/kernels/__init__.py: pack_weight):
//   packed       uint8 [T, Kp, 8], T = ceil(N / 16) tiles of 16 output rows; byte b of (t, k) holds
//                q[16t + b, k] in its low nibble and q[16t + 8 + b, k] in its high one, so one vpmovzxbd
//                of the 8 bytes gives q_lo + 16 q_hi per int32 lane, and `and 0xF0` gives 16 q_hi (rows 8..15).
//   scales_zeros bf16 [T, G, 2, 16]: the 16 scales, then the 16 zeros, of tile t and group j (64 bytes).
// Weights dequantize as w = (q - 8) s + z. With b = z - 8 s, one group's contribution to y[m, n] is
//   sum_k x[m, k] (q s + b) = s * sum_k x[m, k] q[n, k] + b * sum_k x[m, k],
// so for few rows the inner loop multiplies x by the raw codes (converted to fp32 in registers) and each group
// ends with two FMAs per output vector (tile_kernel); for many rows each tile is dequantized once into an fp32
// buffer that all row blocks reuse (buf_kernel). Either way each weight tile is read once, by one thread, for
// all rows of x.
//
// Only AVX2 + FMA code is here (the CPUs this is tested on). An AVX512 variant would widen tile_kernel to
// 32-row tiles (zmm) and an AVX512-BF16 / AMX one would dequantize into bf16 tiles for vdpbf16ps / tdpbf16ps.
//
// Built against torch's stable C ABI (torch/csrc/stable): its headers parse in about a second, where
// torch/library.h + ATen take ten, and parallel_for runs on torch's own intra-op thread pool.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

using namespace effroll;
constexpr int64_t kTile = 16;  // output rows per tile
constexpr int kMaxRows = 6;    // rows of x per micro-kernel call: 6 x 16 outputs = 12 ymm accumulators

#if EFFROLL_X86

struct Problem {
  const uint8_t* w;   // [T, Kp, 8]
  const uint16_t* sz; // [T, G, 2, 16]
  const float* x;     // [M, Kp] fp32, zero past K (so the padded codes of a ragged last group add 0)
  const float* xsum;  // [M, G] per-group sums of x
  uint16_t* y;        // [M, N] bf16
  int64_t n, kp, g, groups;
};

// Rows m0 .. m0 + R of tile t: fp32 accumulators -> bf16 y (the tile's real columns only).
template <int R>
TARGET inline void store_tile(const Problem& p, const __m256 (&acc)[R][2], int64_t t, int64_t m0) {
  const int64_t c0 = t * kTile, cols = std::min<int64_t>(kTile, p.n - c0);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    __m256i v = to_bf16x16(acc[r][0], acc[r][1]);
    uint16_t* dst = p.y + (m0 + r) * p.n + c0;
    if (cols == kTile) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
    } else {
      alignas(32) uint16_t tmp[kTile];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), v);
      std::memcpy(dst, tmp, cols * sizeof(uint16_t));
    }
  }
}

// R rows of x (m0 ..) times tile t, over all groups; writes y[m0 .. m0 + R, 16t .. 16t + 16) (the real columns).
// U independent accumulator sets (k mod U) keep enough FMA chains in flight when R is small.
template <int R, int U>
TARGET void tile_kernel(const Problem& p, int64_t t, int64_t m0) {
  const int64_t g = p.g, kp = p.kp, groups = p.groups;  // locals: the compiler cannot prove stores leave p alone
  const uint8_t* w = p.w + t * kp * 8;
  const uint16_t* sz = p.sz + t * groups * 32;
  const float* x = p.x + m0 * kp;
  const float* xsum = p.xsum + m0 * groups;
  const __m256i hi4 = _mm256_set1_epi32(0xF0);
  const __m256 eight = _mm256_set1_ps(8.f), sixteenth = _mm256_set1_ps(1.f / 16);
  __m256 out[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) out[r][0] = out[r][1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < groups; ++j) {
    __m256 acc[U][R][2];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[u][r][0] = acc[u][r][1] = _mm256_setzero_ps();
    const uint8_t* wj = w + j * g * 8;
    const float* xj = x + j * g;
    for (int64_t k = 0; k < g; k += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wj + (k + u) * 8)));
        // The whole byte q_lo + 16 q_hi and 16 q_hi (masked: a shift would take an FMA port); the group sums give
        // rows 0..7 as their difference. One vpand per 16 codes fewer; the sums are exact integers times x.
        __m256 c0 = _mm256_cvtepi32_ps(b);
        __m256 c1 = _mm256_cvtepi32_ps(_mm256_and_si256(b, hi4));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          __m256 xb = _mm256_broadcast_ss(xj + r * kp + k + u);
          acc[u][r][0] = _mm256_fmadd_ps(c0, xb, acc[u][r][0]);
          acc[u][r][1] = _mm256_fmadd_ps(c1, xb, acc[u][r][1]);
        }
      }
    }
    const uint16_t* sj = sz + j * 32;
    __m256 s0 = load_bf16x8(sj), s1 = load_bf16x8(sj + 8);
    __m256 b0 = _mm256_fnmadd_ps(eight, s0, load_bf16x8(sj + 16));  // z - 8 s (exact in fp32 for bf16 s, z)
    __m256 b1 = _mm256_fnmadd_ps(eight, s1, load_bf16x8(sj + 24));
    s1 = _mm256_mul_ps(s1, sixteenth);  // the high codes come as 16 q; dividing s by 16 is exact
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m256 a0 = acc[0][r][0], a1 = acc[0][r][1];
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) {
        a0 = _mm256_add_ps(a0, acc[u][r][0]);
        a1 = _mm256_add_ps(a1, acc[u][r][1]);
      }
      a0 = _mm256_sub_ps(a0, a1);  // sum x q_lo
      __m256 xs = _mm256_broadcast_ss(xsum + r * groups + j);
      out[r][0] = _mm256_fmadd_ps(s0, a0, _mm256_fmadd_ps(b0, xs, out[r][0]));
      out[r][1] = _mm256_fmadd_ps(s1, a1, _mm256_fmadd_ps(b1, xs, out[r][1]));
    }
  }
  store_tile<R>(p, out, t, m0);
}

// Many rows: dequantize the tile once into fp32 [Kp][16] (w = q s + (z - 8 s)), then run FMA-only blocks of rows
// over it. Decoding in registers costs each 6-row block ~1.3 cycles per k on top of its 6 FMA cycles; this pays
// ~2.5 cycles per k once per tile, so it wins from a few blocks on (measured: equal at 24 rows, 8-10% faster from 32).
TARGET void dequant_tile(const Problem& p, int64_t t, float* wb) {
  const int64_t g = p.g, kp = p.kp, groups = p.groups;
  const uint8_t* w = p.w + t * kp * 8;
  const uint16_t* sz = p.sz + t * groups * 32;
  const __m256i lo4 = _mm256_set1_epi32(0x0F), hi4 = _mm256_set1_epi32(0xF0);
  const __m256 eight = _mm256_set1_ps(8.f), sixteenth = _mm256_set1_ps(1.f / 16);
  for (int64_t j = 0; j < groups; ++j) {
    const uint16_t* sj = sz + j * 32;
    __m256 s0 = load_bf16x8(sj), s1 = load_bf16x8(sj + 8);
    __m256 b0 = _mm256_fnmadd_ps(eight, s0, load_bf16x8(sj + 16));
    __m256 b1 = _mm256_fnmadd_ps(eight, s1, load_bf16x8(sj + 24));
    s1 = _mm256_mul_ps(s1, sixteenth);
    for (int64_t k = j * g; k < (j + 1) * g; ++k) {
      __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k * 8)));
      _mm256_store_ps(wb + k * 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, lo4)), s0, b0));
      _mm256_store_ps(wb + k * 16 + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, hi4)), s1, b1));
    }
  }
}

template <int R>
TARGET void buf_kernel(const Problem& p, const float* wb, int64_t t, int64_t m0) {
  const int64_t kp = p.kp;
  const float* x = p.x + m0 * kp;
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kp; ++k) {
    __m256 w0 = _mm256_load_ps(wb + k * 16), w1 = _mm256_load_ps(wb + k * 16 + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m256 xb = _mm256_broadcast_ss(x + r * kp + k);
      acc[r][0] = _mm256_fmadd_ps(w0, xb, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1, xb, acc[r][1]);
    }
  }
  store_tile<R>(p, acc, t, m0);
}
using BufFn = void (*)(const Problem&, const float*, int64_t, int64_t);
constexpr BufFn kBufFns[kMaxRows + 1] = {nullptr, buf_kernel<1>, buf_kernel<2>, buf_kernel<3>,
                                         buf_kernel<4>, buf_kernel<5>, buf_kernel<6>};
constexpr int64_t kBufMinRows = 25;
constexpr int64_t kBufMaxKp = 3072;  // the fp32 tile (64 bytes per k) stays within half the 512 KiB L2

using TileFn = void (*)(const Problem&, int64_t, int64_t);
// Accumulator sets per row count: at least 8 independent FMA chains (FMA latency 4 x 2 ports) within 12 ymm.
constexpr TileFn kTileFns[kMaxRows + 1] = {nullptr,
                                           tile_kernel<1, 4>, tile_kernel<2, 2>, tile_kernel<3, 2>,
                                           tile_kernel<4, 1>, tile_kernel<5, 1>, tile_kernel<6, 1>};

// Rows m0 .. m1 of x (bf16, row stride ldx) -> fp32 [.., Kp] zero-padded past K, and their group sums.
TARGET void convert_rows(const uint16_t* x, int64_t ldx, int64_t k, const Problem& p, float* xf, float* xs,
                         int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const uint16_t* src = x + m * ldx;
    float* dst = xf + m * p.kp;
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) _mm256_storeu_ps(dst + i, load_bf16x8(src + i));
    for (; i < k; ++i) {
      uint32_t bits = uint32_t(src[i]) << 16;
      std::memcpy(dst + i, &bits, 4);
    }
    for (; i < p.kp; ++i) dst[i] = 0.f;
    for (int64_t j = 0; j < p.groups; ++j) {  // g is a multiple of 8
      __m256 s = _mm256_setzero_ps();
      for (int64_t c = j * p.g; c < (j + 1) * p.g; c += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(dst + c));
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      xs[m * p.groups + j] = _mm_cvtss_f32(h);
    }
  }
}

#endif  // EFFROLL_X86

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

Tensor int4_mm(const Tensor& x, const Tensor& packed, const Tensor& scales_zeros, int64_t group_size, int64_t n) {
  STD_TORCH_CHECK(cpu_supported(), "effroll::int4_mm needs an x86-64 CPU with AVX2 and FMA");
  STD_TORCH_CHECK(x.is_cpu() && packed.is_cpu() && scales_zeros.is_cpu(), "effroll::int4_mm: CPU tensors only");
  STD_TORCH_CHECK(x.dim() == 2 && x.scalar_type() == ScalarType::BFloat16, "effroll::int4_mm: x must be 2-D bfloat16");
  STD_TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 8 && packed.scalar_type() == ScalarType::Byte &&
                      packed.is_contiguous(),
                  "effroll::int4_mm: packed must be contiguous uint8 [T, Kp, 8]");
  const int64_t tiles = packed.size(0), kp = packed.size(1), m = x.size(0), k = x.size(1);
  STD_TORCH_CHECK(group_size > 0 && group_size % 8 == 0 && kp % group_size == 0, "effroll::int4_mm: group_size ",
                  group_size, " must be a positive multiple of 8 dividing Kp=", kp);
  const int64_t groups = kp / group_size;
  STD_TORCH_CHECK(scales_zeros.scalar_type() == ScalarType::BFloat16 && scales_zeros.is_contiguous() &&
                      scales_zeros.dim() == 4 && scales_zeros.size(0) == tiles && scales_zeros.size(1) == groups &&
                      scales_zeros.size(2) == 2 && scales_zeros.size(3) == kTile,
                  "effroll::int4_mm: scales_zeros must be contiguous bfloat16 [", tiles, ", ", groups, ", 2, 16]");
  STD_TORCH_CHECK(k <= kp && k > kp - group_size, "effroll::int4_mm: x has ", k, " columns, the weight ", kp,
                  " (padded to the group size ", group_size, ")");
  STD_TORCH_CHECK(n > (tiles - 1) * kTile && n <= tiles * kTile, "effroll::int4_mm: n=", n, " does not fit ", tiles,
                  " tiles of 16 rows");
  const int64_t sizes[2] = {m, n}, strides[2] = {n, 1};
  AtenTensorHandle out = nullptr;  // direct shim call: no dispatcher lookup per output
  STD_TORCH_CHECK(aoti_torch_empty_strided(2, sizes, strides, aoti_torch_dtype_bfloat16(),
                                           aoti_torch_device_type_cpu(), 0, &out) == AOTI_TORCH_SUCCESS,
                  "effroll::int4_mm: allocating the output failed");
  Tensor y(out);
  if (m == 0 || n == 0) return y;
#if EFFROLL_X86
  const Tensor xc = x.stride(1) == 1 ? x : torch::stable::contiguous(x);
  thread_local std::vector<float> buf;  // reused across calls: no page faults for a fresh buffer each time
  buf.resize(m * (kp + groups));
  float* xf = buf.data();
  float* xs = xf + m * kp;
  Problem p{static_cast<const uint8_t*>(packed.const_data_ptr()), static_cast<const uint16_t*>(scales_zeros.const_data_ptr()),
            xf, xs, static_cast<uint16_t*>(y.mutable_data_ptr()), n, kp, group_size, groups};
  const auto* xb = static_cast<const uint16_t*>(xc.const_data_ptr());
  const int64_t ldx = xc.stride(0);
  torch::stable::parallel_for(0, m, 64, [&](int64_t a, int64_t b) { convert_rows(xb, ldx, k, p, xf, xs, a, b); });
  // Tiles are the parallel unit: each weight tile is read once, by one thread, for all rows of x.
  const int64_t blocks = (m + kMaxRows - 1) / kMaxRows, base = m / blocks, extra = m % blocks;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / (kp * blocks));
  const bool buffered = m >= kBufMinRows && kp <= kBufMaxKp;
  torch::stable::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> wbuf;  // this thread's dequantized tile, 32-byte aligned
    float* wb = nullptr;
    if (buffered) {
      wbuf.resize(kp * kTile + 8);
      wb = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(wbuf.data()) + 31) & ~uintptr_t(31));
    }
    for (int64_t t = t0; t < t1; ++t) {
      if (buffered) dequant_tile(p, t, wb);
      int64_t m0 = 0;
      for (int64_t i = 0; i < blocks; ++i) {  // row blocks as even as possible: 7 rows run as 4 + 3, not 6 + 1
        const int64_t rows = base + (i < extra);
        if (buffered)
          kBufFns[rows](p, wb, t, m0);
        else
          kTileFns[rows](p, t, m0);
        m0 += rows;
      }
    }
  });
#endif
  return y;
}

}  // namespace

// The CPU check, for the Python loader (through ctypes: an op without tensor arguments has no dispatch key).
extern "C" int effroll_int4_cpu_supported() { return cpu_supported() ? 1 : 0; }

STABLE_TORCH_LIBRARY_FRAGMENT(effroll, m) {  // a fragment: bf16_gemm.cpp defines ops of effroll:: too
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scales_zeros, int group_size, int n) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(effroll, CPU, m) { m.impl("int4_mm", TORCH_BOX(&int4_mm)); }
