// effroll::bf16_linear: y[..., N] (bf16) = x[..., K] (bf16) @ W[N, K]^T (+ bias[N]), AVX2 + FMA, fp32 accumulation;
// M = the product of x's leading sizes.
//
// The weight is read in its own [N, K] layout (unit column stride, any row stride): no packed copy doubles the
// model's memory, and a weight changed in place is simply read again. Dot-product form: a micro-kernel takes NR
// weight rows and MR rows of x and keeps one 8-lane fp32 accumulator per output; each 32-byte weight load holds
// 16 consecutive k as 8 int32 words, whose `<< 16` is the even k and `& 0xFFFF0000` the odd k as fp32 (exact),
// so x is converted once per call into fp32 chunks of 16 k laid out [8 even | 8 odd] (zero past K), and the
// lanes are summed at the end. Each output is the same sequence of operations whatever M, NR, MR or the thread
// count (chunks in k order, FMA even then odd, the same horizontal sum): a row's result does not depend on the
// batch it came in.
//
// Output columns are the parallel unit (torch::stable::parallel_for over blocks of NR weight rows), so each
// weight byte is read once per call, by one thread. Rows of x go in blocks of at most 6; a thread takes its
// weight in passes of ~128 KiB, each pass meeting every row block while it stays in L2, with the first row
// block prefetching ahead in the weight (from DRAM).
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "simd.h"

namespace {

using namespace effroll;

#if EFFROLL_X86

struct Problem {
  const uint16_t* w;  // [N, K] bf16, row stride ldw
  const float* x;     // [M * kp] fp32 by row blocks (see convert_block), zero past K
  const float* bias;  // [N + 4] fp32 (zeros without a bias, or past N)
  uint16_t* y;        // [M, N] bf16
  int64_t n, k, kp, ldw;
};

// The horizontal sums of 4 accumulators: lane i of the result is ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
// of the i-th one, whichever accumulators share the call (the order every output is summed in).
TARGET inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Keep v in a register: without this gcc folds a load into every instruction that uses it (one 32-byte load
// per FMA), and loads, not FMAs, become the limit.
#define EFFROLL_IN_REG(v) __asm__("" : "+x"(v))
alignas(32) const uint32_t kHiMask[8] = {0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u,
                                         0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u};

// One 16-k chunk of NR weight rows (w, row stride ldw) into the NR x MR accumulators; x row j's chunk at x + 16 j.
// Every output gets fma(even halves) then fma(odd halves). Two register plans:
//   !SPLIT (one row of x): its two x vectors stay in registers while each weight row is loaded once and split.
//   SPLIT: the even halves of all NR weight rows (NR registers) meet each x row's even vector in turn, then the
//          odd halves (the weight loaded again, from L1) the odd ones: NR + 1 registers besides the accumulators,
//          and 2 (NR + MR) loads per 2 NR MR FMAs.
template <int NR, int MR, bool SPLIT>
TARGET inline void chunk(__m256 (&acc)[NR][MR], const uint16_t* w, int64_t ldw, const float* x) {
  const __m256i hi = _mm256_set1_epi32(int(0xFFFF0000u));
  if constexpr (!SPLIT) {
    __m256 xe[MR], xo[MR];
#pragma GCC unroll 8
    for (int j = 0; j < MR; ++j) {
      xe[j] = _mm256_load_ps(x + j * 16);
      xo[j] = _mm256_load_ps(x + j * 16 + 8);
      EFFROLL_IN_REG(xe[j]);
      EFFROLL_IN_REG(xo[j]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ldw));
      EFFROLL_IN_REG(v);
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
#pragma GCC unroll 8
      for (int j = 0; j < MR; ++j) acc[i][j] = _mm256_fmadd_ps(we, xe[j], acc[i][j]);
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
#pragma GCC unroll 8
      for (int j = 0; j < MR; ++j) acc[i][j] = _mm256_fmadd_ps(wo, xo[j], acc[i][j]);
    }
  } else {
    __m256 h[NR];
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) {
      h[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ldw)), 16));
      EFFROLL_IN_REG(h[i]);
    }
#pragma GCC unroll 8
    for (int j = 0; j < MR; ++j) {
      __m256 xe = _mm256_load_ps(x + j * 16);
      EFFROLL_IN_REG(xe);
#pragma GCC unroll 8
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm256_fmadd_ps(h[i], xe, acc[i][j]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ldw));
      __asm__("vpand %1, %0, %0" : "+x"(v) : "m"(kHiMask));  // the mask from memory: no register for it
      h[i] = _mm256_castsi256_ps(v);
    }
#pragma GCC unroll 8
    for (int j = 0; j < MR; ++j) {
      __m256 xo = _mm256_load_ps(x + j * 16 + 8);
      EFFROLL_IN_REG(xo);
#pragma GCC unroll 8
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm256_fmadd_ps(h[i], xo, acc[i][j]);
    }
  }
}

// Weight rows n0 .. n0 + NR times the row block of MR rows at m0, over all of K; writes y[m0 .., n0 ..] (+ bias).
// pf > 0: prefetch the weight rows pf rows ahead (the next blocks of this pass), in address order, 2 chunks (NR
// lines) per 2 chunks consumed.
template <int NR, int MR>
TARGET void block(const Problem& p, int64_t n0, int64_t m0, int64_t pf) {
  constexpr bool kSplit = MR > 1;
  const int64_t k = p.k, kfull = k & ~int64_t(15), ldw = p.ldw, kp = p.kp;
  const uint16_t* w = p.w + n0 * ldw;
  const float* x = p.x + m0 * kp;
  __m256 acc[NR][MR];
#pragma GCC unroll 8
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < MR; ++j) acc[i][j] = _mm256_setzero_ps();
  // K % 16 columns: from zero-padded copies (x is zero there too, and reading past a row could fault). One loop
  // for both, so that gcc keeps the accumulators in registers.
  alignas(32) uint16_t t[NR][16];
  if (kfull < k) {
    std::memset(t, 0, sizeof(t));
#pragma GCC unroll 8
    for (int i = 0; i < NR; ++i) std::memcpy(t[i], w + i * ldw + kfull, (k - kfull) * sizeof(uint16_t));
  }
  const char* pw = reinterpret_cast<const char*>(w + pf * ldw);
  for (int64_t kk = 0; kk < kp; kk += 16) {
    if (pf > 0 && !(kk & 31)) {
#pragma GCC unroll 8
      for (int i = 0; i < NR; ++i) _mm_prefetch(pw + (kk * NR + i * 32) * 2, _MM_HINT_T0);
    }
    const bool full = kk < kfull;
    chunk<NR, MR, kSplit>(acc, full ? w + kk : t[0], full ? ldw : 16, x + kk * MR);
  }
  const __m256 z = _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int j = 0; j < MR; ++j) {
    uint16_t* dst = p.y + (m0 + j) * p.n + n0;
#pragma GCC unroll 8
    for (int i = 0; i < NR; i += 4) {
      __m128 s = hsum4(acc[i][j], i + 1 < NR ? acc[i + 1][j] : z, i + 2 < NR ? acc[i + 2][j] : z,
                       i + 3 < NR ? acc[i + 3][j] : z);
      s = _mm_add_ps(s, _mm_loadu_ps(p.bias + n0 + i));
      __m128i b = to_bf16_lanes(s);
      b = _mm_packus_epi32(b, b);
      if (i + 4 <= NR) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + i), b);
      } else {
        alignas(16) uint16_t o[8];
        _mm_store_si128(reinterpret_cast<__m128i*>(o), b);
        std::memcpy(dst + i, o, (NR - i) * sizeof(uint16_t));
      }
    }
  }
}

// Block shapes. One row of x (bandwidth-bound): 8 weight rows, the x vectors in 2 registers. More rows (SPLIT):
// accumulators + NR weight halves + 1 x vector must fit the 16 ymm registers, and gcc spills at 16: so 4 x 2,
// 3 x 3, then 2 x 4 .. 2 x 6 (24 FMAs per 16 loads and 4 shift/and). Rows go in blocks of at most 6.
constexpr int kMaxNR = 8, kMaxMR = 6;
constexpr int kNR[kMaxMR + 1] = {0, 8, 4, 3, 2, 2, 2};  // weight rows for a call whose largest row block is MR
using BlockFn = void (*)(const Problem&, int64_t, int64_t, int64_t);
template <int NR, int MR>
constexpr BlockFn fn() {
  if constexpr (NR <= kNR[MR]) return block<NR, MR>;
  return nullptr;
}
#define EFFROLL_ROW(NR) {nullptr, fn<NR, 1>(), fn<NR, 2>(), fn<NR, 3>(), fn<NR, 4>(), fn<NR, 5>(), fn<NR, 6>()}
constexpr BlockFn kFns[kMaxNR + 1][kMaxMR + 1] = {{}, EFFROLL_ROW(1), EFFROLL_ROW(2), EFFROLL_ROW(3), EFFROLL_ROW(4),
                                                  EFFROLL_ROW(5), EFFROLL_ROW(6), EFFROLL_ROW(7), EFFROLL_ROW(8)};
#undef EFFROLL_ROW

// 16 bf16 (v) -> fp32 at dst as [8 even k | 8 odd k].
TARGET inline void put_chunk(float* dst, __m256i v) {
  _mm256_store_si256(reinterpret_cast<__m256i*>(dst), _mm256_slli_epi32(v, 16));
  _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 8), _mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))));
}

// Rows m0 .. m0 + r of x (bf16, row stride ldx), one block of the kernel, -> fp32 at xf + m0 kp, chunk by chunk:
// chunk c of row j at (c r + j) 16 floats, so a block's x vectors are one pointer plus constants (32-byte aligned).
TARGET void convert_block(const uint16_t* x, int64_t ldx, int64_t k, int64_t kp, float* xf, int64_t m0, int64_t r) {
  float* base = xf + m0 * kp;
  for (int64_t j = 0; j < r; ++j) {
    const uint16_t* src = x + (m0 + j) * ldx;
    int64_t kk = 0;
    for (; kk + 16 <= k; kk += 16)
      put_chunk(base + (kk * r + j * 16), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + kk)));
    if (kk < k) {
      alignas(32) uint16_t t[16] = {};
      std::memcpy(t, src + kk, (k - kk) * sizeof(uint16_t));
      put_chunk(base + (kk * r + j * 16), _mm256_load_si256(reinterpret_cast<const __m256i*>(t)));
    }
  }
}

#endif  // EFFROLL_X86

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

Tensor bf16_linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  STD_TORCH_CHECK(cpu_supported(), "effroll::bf16_linear needs an x86-64 CPU with AVX2 and FMA");
  STD_TORCH_CHECK(x.is_cpu() && w.is_cpu(), "effroll::bf16_linear: CPU tensors only");
  STD_TORCH_CHECK(x.dim() >= 2 && x.scalar_type() == ScalarType::BFloat16,
                  "effroll::bf16_linear: x must be bfloat16 with at least 2 dims, got ", x.dim(), "-D");
  STD_TORCH_CHECK(w.dim() == 2 && w.scalar_type() == ScalarType::BFloat16,
                  "effroll::bf16_linear: w must be 2-D bfloat16, got ", w.dim(), "-D");
  const int64_t d = x.dim(), k = x.size(d - 1), n = w.size(0);
  STD_TORCH_CHECK(w.size(1) == k, "effroll::bf16_linear: x has ", k, " columns, w has ", w.size(1));
  STD_TORCH_CHECK(w.stride(1) == 1 || w.size(1) <= 1, "effroll::bf16_linear: w's columns must be contiguous (stride ",
                  w.stride(1), ")");
  if (bias.has_value()) {
    STD_TORCH_CHECK(bias->is_cpu() && bias->dim() == 1 && bias->size(0) == n &&
                        bias->scalar_type() == ScalarType::BFloat16,
                    "effroll::bf16_linear: bias must be a CPU bfloat16 vector of ", n, " (w's rows)");
  }
  // x [..., K] is M = prod(leading sizes) rows: read in place when they are one row stride apart (any row stride,
  // unit column stride), else from a contiguous copy. The output is [..., N], contiguous.
  int64_t m = 1;
  bool rows_ok = x.stride(d - 1) == 1 || k <= 1;
  for (int64_t i = 0; i < d - 1; ++i) {
    m *= x.size(i);
    if (i + 1 < d - 1 && x.size(i) > 1 && x.stride(i) != x.stride(i + 1) * x.size(i + 1)) rows_ok = false;
  }
  std::vector<int64_t> sizes(d), strides(d);
  for (int64_t i = d - 1; i >= 0; --i) {
    sizes[i] = i == d - 1 ? n : x.size(i);
    strides[i] = i == d - 1 ? 1 : strides[i + 1] * sizes[i + 1];
  }
  AtenTensorHandle out = nullptr;  // direct shim call: no dispatcher lookup per output
  STD_TORCH_CHECK(aoti_torch_empty_strided(d, sizes.data(), strides.data(), aoti_torch_dtype_bfloat16(),
                                           aoti_torch_device_type_cpu(), 0, &out) == AOTI_TORCH_SUCCESS,
                  "effroll::bf16_linear: allocating the output failed");
  Tensor y(out);
  if (m == 0 || n == 0) return y;
#if EFFROLL_X86
  const Tensor xc = rows_ok ? x : torch::stable::contiguous(x);
  const int64_t kp = (k + 15) & ~int64_t(15);
  thread_local std::vector<float> buf;  // reused across calls: no page faults for a fresh buffer each time
  buf.resize(m * kp + n + 4 + 8);
  float* xf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 31) & ~uintptr_t(31));
  float* bf = xf + m * kp;
  std::fill(bf, bf + n + 4, 0.f);
  if (bias.has_value()) {
    const Tensor bc = bias->stride(0) == 1 ? *bias : torch::stable::contiguous(*bias);
    const auto* b16 = static_cast<const uint16_t*>(bc.const_data_ptr());
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits = uint32_t(b16[i]) << 16;
      std::memcpy(bf + i, &bits, 4);
    }
  }
  const auto* xb = static_cast<const uint16_t*>(xc.const_data_ptr());
  const int64_t ldx = xc.stride(d - 2);
  // Row blocks of at most kMaxMR rows, as even as possible (7 rows run as 4 + 3, not 6 + 1).
  const int64_t nrb = (m + kMaxMR - 1) / kMaxMR, rbase = m / nrb, rextra = m % nrb;
  const int64_t mr = rbase + (rextra > 0);
  const int64_t nr = kNR[mr];
  const auto row0 = [=](int64_t i) { return i * rbase + std::min(i, rextra); };
  torch::stable::parallel_for(0, nrb, 16, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) convert_block(xb, ldx, k, kp, xf, row0(i), row0(i + 1) - row0(i));
  });
  Problem p{static_cast<const uint16_t*>(w.const_data_ptr()), xf, bf, static_cast<uint16_t*>(y.mutable_data_ptr()),
            n, k, kp, w.stride(0)};
  const int64_t nblocks = (n + nr - 1) / nr, block_bytes = std::max<int64_t>(64, nr * std::max(w.stride(0), k) * 2);
  // Prefetch distance: whole blocks, about 8 KiB ahead (measured: 1-4 blocks within noise, none 1.4-2x slower).
  const int64_t pf_blocks = std::max<int64_t>(1, ((int64_t(1) << 13) + block_bytes - 1) / block_bytes);
  // Weight blocks per pass: ~128 KiB of weight stays in L2 while every row block of x (one in L1 at a time) meets
  // it; so the weight comes from DRAM once per call and x from L2 (or L3 when large) once per pass.
  const int64_t pass = std::max<int64_t>(1, (int64_t(1) << 17) / block_bytes);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / block_bytes);  // >= 32 KiB of weight a task
  torch::stable::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0; c0 < b1; c0 += pass) {
      const int64_t c1 = std::min(b1, c0 + pass);
      for (int64_t i = 0; i < nrb; ++i) {
        const int64_t m0 = row0(i), r = row0(i + 1) - m0;
        const int64_t pf = i == 0 ? pf_blocks * nr : 0;  // later row blocks find this pass's weight in L2
        for (int64_t b = c0; b < c1; ++b) {
          const int64_t n0 = b * nr;
          kFns[std::min<int64_t>(nr, n - n0)][r](p, n0, m0, pf);
        }
      }
    }
  });
#endif
  return y;
}

}  // namespace

// The CPU check, for the Python loader (through ctypes: an op without tensor arguments has no dispatch key).
extern "C" int effroll_bf16_cpu_supported() { return cpu_supported() ? 1 : 0; }

STABLE_TORCH_LIBRARY_FRAGMENT(effroll, m) {  // a fragment: int4_gemm.cpp defines ops of effroll:: too
  m.def("bf16_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(effroll, CPU, m) { m.impl("bf16_linear", TORCH_BOX(&bf16_linear)); }
