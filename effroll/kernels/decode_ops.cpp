// effroll's glue ops for bf16 models on AVX2 CPUs, in fp32 arithmetic (AVX2 + FMA):
//
// effroll::cache_attention(q [B, T, h, hd], kc, vc [slots, hkv, cap, hd], pos [B, T] int64, row0, scale)
//   -> [B, T, h, hd] bf16: query (b, t, head) attends keys 0 ..= pos[b, t] of slot row0 + b, kv head
//   head / (h / hkv) (GQA), with an fp32 softmax. Each query is computed on its own, in an order fixed by its
//   own keys, so its result does not depend on B, T or the other queries: decode (T = 1) and verify or
//   prefill (T > 1) give a position the same output.
// effroll::rms_norm(x [M, D], weight [D], eps) -> bf16: x * rsqrt(mean(x^2) + eps) * weight in fp32, rounded
//   once (as torch's F.rms_norm for bf16), one pass over each row, each row on its own.
// effroll::rope_cache_write(qkv [B, T, h + 2 hkv, hd], cos, sin [B, T, 1, hd], kc, vc, pos, row0, h) -> q [B, T, h,
//   hd]: RoPE on the query and key heads, the keys and values written to slot row0 + b at position pos[b, t].
// effroll::silu_mul(gate_up [M, 2 I]) -> [M, I]: silu(gate) * up.
// All of them: fp32 inside, one rounding per output, each row (and query) on its own.
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

using namespace effroll;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

Tensor empty_bf16(int64_t dim, const int64_t* sizes, const int64_t* strides) {
  AtenTensorHandle out = nullptr;  // direct shim call: no dispatcher lookup per output
  STD_TORCH_CHECK(aoti_torch_empty_strided(dim, sizes, strides, aoti_torch_dtype_bfloat16(),
                                           aoti_torch_device_type_cpu(), 0, &out) == AOTI_TORCH_SUCCESS,
                  "effroll: allocating an output failed");
  return Tensor(out);
}

#if EFFROLL_X86

// 16 floats (a: columns 0..7, b: 8..15) -> the first `cols` of 16 bf16 at dst.
TARGET inline void store_bf16x16(uint16_t* dst, __m256 a, __m256 b, int64_t cols) {
  __m256i v = to_bf16x16(a, b);
  if (cols == 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
  } else {
    alignas(32) uint16_t tmp[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), v);
    std::memcpy(dst, tmp, cols * sizeof(uint16_t));
  }
}

// 8 floats -> 8 bf16 at dst (round to nearest even).
TARGET inline void store_bf16x8(uint16_t* dst, __m256 a) {
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(to_bf16_lanes(a), to_bf16_lanes(a)), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(p));
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The same rounding as to_bf16_lanes, one value.
inline uint16_t float_to_bf16(float f) {
  uint32_t i;
  std::memcpy(&i, &f, 4);
  if (f != f) return uint16_t((i | 0x400000u) >> 16);
  return uint16_t((i + 0x7FFFu + ((i >> 16) & 1u)) >> 16);
}

// n bf16 (a multiple of 8) -> fp32 (exact).
TARGET inline void bf16_to_f32(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(dst + i, load_bf16x8(src + i));
}

TARGET inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

TARGET inline float hmax(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// exp(x) for x <= 0 (Cephes' expf polynomial, ~1 ulp); below -87 it returns ~1e-38, not 0.
TARGET inline __m256 exp_nonpos(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 8 vectors -> one vector of their 8 horizontal sums (lane i: sum of a[i]); each sum's order is fixed.
TARGET inline __m256 hsum8(const __m256* a) {
  __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

struct Attn {
  const uint16_t* k;  // slot row0 + b, kv head: base + (b * sk + kvh * shk), position stride hd
  const uint16_t* v;
  int64_t sk, shk, sv, shv, hd;
  float scale;
};

// One query (fp32 q[hd]) against keys and values 0 .. n-1 (fp32 [n, hd]) of one (slot, kv head); s: scratch
// of n rounded up to 8 floats.
TARGET void attend(const Attn& a, const float* kb, const float* vb, const float* q, int64_t n, float* s,
                   uint16_t* out) {
  const int64_t hd = a.hd;
  const __m256 scale = _mm256_set1_ps(a.scale);
  __m256 mx = _mm256_set1_ps(-INFINITY);
  for (int64_t j0 = 0; j0 < n; j0 += 8) {  // 8 keys at a time; past n the last key repeats (no read past it)
    const float* kr[8];
    __m256 acc[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      kr[i] = kb + std::min(j0 + i, n - 1) * hd;
      acc[i] = _mm256_setzero_ps();
    }
    for (int64_t c = 0; c < hd; c += 8) {
      const __m256 qc = _mm256_loadu_ps(q + c);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(kr[i] + c), qc, acc[i]);
    }
    const __m256 sc = _mm256_mul_ps(hsum8(acc), scale);
    _mm256_storeu_ps(s + j0, sc);
    mx = _mm256_max_ps(mx, sc);  // the repeated last key changes no maximum
  }
  const __m256 m = _mm256_set1_ps(hmax(mx));
  __m256 sum = _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j0), m));
    const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - j0)), lane));
    e = _mm256_and_ps(e, live);
    _mm256_storeu_ps(s + j0, e);
    sum = _mm256_add_ps(sum, e);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / hsum(sum));
  int64_t c0 = 0;
  for (; c0 + 64 <= hd; c0 += 64) {  // 64 dims (8 accumulators) at a time
    __m256 o[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) o[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 p = _mm256_broadcast_ss(s + j);
      const float* vj = vb + j * hd + c0;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) o[i] = _mm256_fmadd_ps(_mm256_loadu_ps(vj + 8 * i), p, o[i]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 8; i += 2)
      store_bf16x16(out + c0 + 8 * i, _mm256_mul_ps(o[i], inv), _mm256_mul_ps(o[i + 1], inv), 16);
  }
  for (; c0 < hd; c0 += 8) {  // head dims that are not a multiple of 64: 8 at a time
    __m256 o = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) o = _mm256_fmadd_ps(_mm256_loadu_ps(vb + j * hd + c0), _mm256_broadcast_ss(s + j), o);
    store_bf16x16(out + c0, _mm256_mul_ps(o, inv), _mm256_setzero_ps(), 8);
  }
}

TARGET void rms_rows(const uint16_t* x, int64_t ldx, const uint16_t* w, float eps, int64_t d, uint16_t* y,
                     int64_t m0, int64_t m1) {
  for (int64_t r = m0; r < m1; ++r) {
    const uint16_t* xr = x + r * ldx;
    __m256 ss = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8) {
      const __m256 v = load_bf16x8(xr + c);
      ss = _mm256_fmadd_ps(v, v, ss);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(hsum(ss) / float(d) + eps));
    for (int64_t c = 0; c < d; c += 16)
      store_bf16x16(y + r * d + c, _mm256_mul_ps(_mm256_mul_ps(load_bf16x8(xr + c), inv), load_bf16x8(w + c)),
                    _mm256_mul_ps(_mm256_mul_ps(load_bf16x8(xr + c + 8), inv), load_bf16x8(w + c + 8)), 16);
  }
}


// One (row, position): RoPE on the h + hkv query/key heads of qkv (x * cos + rotate_half(x) * sin, rotate_half's
// sign folded into sin, as the model's tables hold it), the query heads to q, the key heads and the value heads to
// their cache position. fp32 inside, one rounding per value.
TARGET void rope_row(const uint16_t* x, int64_t hstride, const uint16_t* cs, const uint16_t* sn, int64_t nq,
                     int64_t nk, int64_t hd, uint16_t* q, uint16_t* k, int64_t kstride, uint16_t* v,
                     int64_t vstride) {
  const int64_t half = hd / 2, vec = half & ~int64_t(7);
  for (int64_t j = 0; j < nq + nk; ++j) {
    const uint16_t* xr = x + j * hstride;
    uint16_t* dst = j < nq ? q + j * hd : k + (j - nq) * kstride;
    for (int64_t c = 0; c < vec; c += 8) {
      const __m256 lo = load_bf16x8(xr + c), hi = load_bf16x8(xr + half + c);
      const __m256 a = _mm256_fmadd_ps(lo, load_bf16x8(cs + c), _mm256_mul_ps(hi, load_bf16x8(sn + c)));
      const __m256 b = _mm256_fmadd_ps(hi, load_bf16x8(cs + half + c), _mm256_mul_ps(lo, load_bf16x8(sn + half + c)));
      store_bf16x8(dst + c, a);
      store_bf16x8(dst + half + c, b);
    }
    for (int64_t c = vec; c < half; ++c) {  // head dims that are not a multiple of 16
      const float lo = bf16_to_float(xr[c]), hi = bf16_to_float(xr[half + c]);
      dst[c] = float_to_bf16(std::fma(lo, bf16_to_float(cs[c]), hi * bf16_to_float(sn[c])));
      dst[half + c] = float_to_bf16(std::fma(hi, bf16_to_float(cs[half + c]), lo * bf16_to_float(sn[half + c])));
    }
  }
  for (int64_t j = 0; j < nk; ++j) std::memcpy(v + j * vstride, x + (nq + nk + j) * hstride, hd * sizeof(uint16_t));
}

// silu(gate) * up for `n` columns (gate at g, up at u), fp32 inside, one rounding.
TARGET void silu_mul_row(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* y) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t c = 0; c < n; c += 8) {  // n is a multiple of 8
    const __m256 x = load_bf16x8(g + c);
    const __m256 e = exp_nonpos(_mm256_sub_ps(zero, _mm256_and_ps(x, absmask)));  // exp(-|x|)
    const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
    store_bf16x8(y + c, _mm256_mul_ps(_mm256_mul_ps(x, sig), load_bf16x8(u + c)));
  }
}

#endif  // EFFROLL_X86

bool is_bf16(const Tensor& t) { return t.is_cpu() && t.scalar_type() == ScalarType::BFloat16; }

// pos as a contiguous CPU int64 [B, T] tensor, every position inside a cache of `cap` (else an error naming `op`).
Tensor checked_positions(const Tensor& pos, int64_t B, int64_t T, int64_t cap, const char* op) {
  STD_TORCH_CHECK(pos.is_cpu() && pos.scalar_type() == ScalarType::Long && pos.dim() == 2 && pos.size(0) == B &&
                      pos.size(1) == T,
                  "effroll::", op, ": pos must be CPU int64 [B, T]");
  Tensor pc = pos.is_contiguous() ? pos : torch::stable::contiguous(pos);
  const auto* pp = static_cast<const int64_t*>(pc.const_data_ptr());
  for (int64_t i = 0; i < B * T; ++i)
    STD_TORCH_CHECK(pp[i] >= 0 && pp[i] < cap, "effroll::", op, ": position ", pp[i], " outside the cache (", cap, ")");
  return pc;
}

Tensor cache_attention(const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& pos, int64_t row0,
                       double scale) {
  STD_TORCH_CHECK(cpu_supported(), "effroll::cache_attention needs an x86-64 CPU with AVX2 and FMA");
  STD_TORCH_CHECK(q.dim() == 4 && kc.dim() == 4 && vc.dim() == 4 && is_bf16(q) && is_bf16(kc) && is_bf16(vc),
                  "effroll::cache_attention: q [B, T, h, hd] and caches [slots, hkv, cap, hd] must be CPU bfloat16");
  const int64_t B = q.size(0), T = q.size(1), h = q.size(2), hd = q.size(3);
  const int64_t hkv = kc.size(1), cap = kc.size(2);
  STD_TORCH_CHECK(vc.size(0) == kc.size(0) && vc.size(1) == hkv && vc.size(2) == cap && kc.size(3) == hd &&
                      vc.size(3) == hd && hkv > 0 && h % hkv == 0 && hd % 8 == 0,
                  "effroll::cache_attention: shapes do not match (h a multiple of hkv, hd a multiple of 8)");
  STD_TORCH_CHECK(q.stride(3) == 1 && kc.stride(3) == 1 && vc.stride(3) == 1 && kc.stride(2) == hd &&
                      vc.stride(2) == hd,
                  "effroll::cache_attention: head_dim and position must be contiguous in q and the caches");
  STD_TORCH_CHECK(row0 >= 0 && row0 + B <= kc.size(0), "effroll::cache_attention: rows ", row0, "..", row0 + B,
                  " outside ", kc.size(0), " slots");
  const Tensor pc = checked_positions(pos, B, T, cap, "cache_attention");
  const auto* pp = static_cast<const int64_t*>(pc.const_data_ptr());
  const int64_t sizes[4] = {B, T, h, hd}, strides[4] = {T * h * hd, h * hd, hd, 1};
  Tensor y = empty_bf16(4, sizes, strides);
  if (B * T == 0) return y;
#if EFFROLL_X86
  const int64_t g = h / hkv, tb = 16, tblocks = (T + tb - 1) / tb;
  Attn a{static_cast<const uint16_t*>(kc.const_data_ptr()) + row0 * kc.stride(0),
         static_cast<const uint16_t*>(vc.const_data_ptr()) + row0 * vc.stride(0),
         kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1), hd, float(scale)};
  const auto* qb = static_cast<const uint16_t*>(q.const_data_ptr());
  auto* yb = static_cast<uint16_t*>(y.mutable_data_ptr());
  // Work items: (row, kv head, block of 16 positions). Each converts the keys and values its queries read to
  // fp32 once (exact), for its T x g queries: the bf16 -> fp32 shifts are then not redone per query.
  torch::stable::parallel_for(0, B * hkv * tblocks, 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> buf;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (hkv * tblocks), kvh = i / tblocks % hkv, t0 = i % tblocks * tb, t1 = std::min(T, t0 + tb);
      int64_t nmax = 0;
      for (int64_t t = t0; t < t1; ++t) nmax = std::max(nmax, pp[b * T + t] + 1);
      buf.resize(2 * nmax * hd + hd + nmax + 8);
      float *kf = buf.data(), *vf = kf + nmax * hd, *qf = vf + nmax * hd, *s = qf + hd;
      const uint16_t* kb = a.k + b * a.sk + kvh * a.shk;
      const uint16_t* vb = a.v + b * a.sv + kvh * a.shv;
      bf16_to_f32(kb, nmax * hd, kf);  // positions are contiguous rows of hd
      bf16_to_f32(vb, nmax * hd, vf);
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t hh = kvh * g; hh < (kvh + 1) * g; ++hh) {
          bf16_to_f32(qb + b * q.stride(0) + t * q.stride(1) + hh * q.stride(2), hd, qf);
          attend(a, kf, vf, qf, pp[b * T + t] + 1, s, yb + ((b * T + t) * h + hh) * hd);
        }
    }
  });
#endif
  return y;
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  STD_TORCH_CHECK(cpu_supported(), "effroll::rms_norm needs an x86-64 CPU with AVX2 and FMA");
  STD_TORCH_CHECK(x.dim() == 2 && is_bf16(x) && x.stride(1) == 1 && weight.dim() == 1 && is_bf16(weight) &&
                      weight.is_contiguous() && weight.size(0) == x.size(1) && x.size(1) % 16 == 0,
                  "effroll::rms_norm: x [M, D] (rows contiguous) and weight [D] must be CPU bfloat16, D a multiple "
                  "of 16");
  const int64_t m = x.size(0), d = x.size(1);
  const int64_t sizes[2] = {m, d}, strides[2] = {d, 1};
  Tensor y = empty_bf16(2, sizes, strides);
#if EFFROLL_X86
  const auto* xb = static_cast<const uint16_t*>(x.const_data_ptr());
  const auto* wb = static_cast<const uint16_t*>(weight.const_data_ptr());
  auto* yb = static_cast<uint16_t*>(y.mutable_data_ptr());
  const int64_t ldx = x.stride(0);
  torch::stable::parallel_for(0, m, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(d, 1)),
                              [&](int64_t a, int64_t b) { rms_rows(xb, ldx, wb, float(eps), d, yb, a, b); });
#endif
  return y;
}

Tensor rope_cache_write(const Tensor& qkv, const Tensor& cos, const Tensor& sin, Tensor kc, Tensor vc,
                        const Tensor& pos, int64_t row0, int64_t h) {
  STD_TORCH_CHECK(cpu_supported(), "effroll::rope_cache_write needs an x86-64 CPU with AVX2 and FMA");
  STD_TORCH_CHECK(qkv.dim() == 4 && cos.dim() == 4 && sin.dim() == 4 && kc.dim() == 4 && vc.dim() == 4 &&
                      is_bf16(qkv) && is_bf16(cos) && is_bf16(sin) && is_bf16(kc) && is_bf16(vc),
                  "effroll::rope_cache_write: qkv [B, T, h + 2 hkv, hd], cos/sin [B, T, 1, hd] and caches "
                  "[slots, hkv, cap, hd] must be CPU bfloat16");
  const int64_t B = qkv.size(0), T = qkv.size(1), hd = qkv.size(3), hkv = kc.size(1), cap = kc.size(2);
  STD_TORCH_CHECK(h > 0 && qkv.size(2) == h + 2 * hkv && kc.size(3) == hd && vc.size(1) == hkv &&
                      vc.size(2) == cap && vc.size(3) == hd && hd % 2 == 0,
                  "effroll::rope_cache_write: shapes do not match (qkv has h + 2 hkv heads, hd even)");
  for (const Tensor* t : {&cos, &sin})
    STD_TORCH_CHECK(t->size(0) == B && t->size(1) == T && t->size(3) == hd && t->stride(3) == 1,
                    "effroll::rope_cache_write: cos/sin must be [B, T, 1, hd] with contiguous head dims");
  STD_TORCH_CHECK(qkv.stride(3) == 1 && kc.is_contiguous() && vc.is_contiguous(),
                  "effroll::rope_cache_write: qkv's head dims and the caches must be contiguous");
  STD_TORCH_CHECK(row0 >= 0 && row0 + B <= kc.size(0) && vc.size(0) == kc.size(0),
                  "effroll::rope_cache_write: rows ", row0, "..", row0 + B, " outside ", kc.size(0), " slots");
  const Tensor pc = checked_positions(pos, B, T, cap, "rope_cache_write");
  const auto* pp = static_cast<const int64_t*>(pc.const_data_ptr());
  const int64_t sizes[4] = {B, T, h, hd}, strides[4] = {T * h * hd, h * hd, hd, 1};
  Tensor q = empty_bf16(4, sizes, strides);
#if EFFROLL_X86
  const auto* xb = static_cast<const uint16_t*>(qkv.const_data_ptr());
  const auto* cb = static_cast<const uint16_t*>(cos.const_data_ptr());
  const auto* sb = static_cast<const uint16_t*>(sin.const_data_ptr());
  auto* kb = static_cast<uint16_t*>(kc.mutable_data_ptr());
  auto* vb = static_cast<uint16_t*>(vc.mutable_data_ptr());
  auto* qb = static_cast<uint16_t*>(q.mutable_data_ptr());
  const int64_t ss = kc.stride(0), sh = kc.stride(1);  // the same for vc (both contiguous, same shape)
  torch::stable::parallel_for(0, B * T, 16, [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i) {
      const int64_t b = i / T, t = i % T, p = pp[i];
      rope_row(xb + b * qkv.stride(0) + t * qkv.stride(1), qkv.stride(2), cb + b * cos.stride(0) + t * cos.stride(1),
               sb + b * sin.stride(0) + t * sin.stride(1), h, hkv, hd, qb + i * h * hd,
               kb + (row0 + b) * ss + p * hd, sh, vb + (row0 + b) * ss + p * hd, sh);
    }
  });
#endif
  return q;
}

Tensor silu_mul(const Tensor& gu) {
  STD_TORCH_CHECK(cpu_supported(), "effroll::silu_mul needs an x86-64 CPU with AVX2 and FMA");
  STD_TORCH_CHECK(gu.dim() == 2 && is_bf16(gu) && gu.stride(1) == 1 && gu.size(1) % 16 == 0,
                  "effroll::silu_mul: gate_up must be CPU bfloat16 [M, 2 I] (rows contiguous, I a multiple of 8)");
  const int64_t m = gu.size(0), n = gu.size(1) / 2;
  const int64_t sizes[2] = {m, n}, strides[2] = {n, 1};
  Tensor y = empty_bf16(2, sizes, strides);
#if EFFROLL_X86
  const auto* gb = static_cast<const uint16_t*>(gu.const_data_ptr());
  auto* yb = static_cast<uint16_t*>(y.mutable_data_ptr());
  const int64_t ld = gu.stride(0);
  torch::stable::parallel_for(0, m, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(n, 1)),
                              [&](int64_t a, int64_t b) {
                                for (int64_t r = a; r < b; ++r) silu_mul_row(gb + r * ld, gb + r * ld + n, n, yb + r * n);
                              });
#endif
  return y;
}

}  // namespace

// The CPU check, for the Python loader (through ctypes: an op without tensor arguments has no dispatch key).
extern "C" int effroll_decode_cpu_supported() { return cpu_supported() ? 1 : 0; }

STABLE_TORCH_LIBRARY_FRAGMENT(effroll, m) {
  m.def("cache_attention(Tensor q, Tensor kc, Tensor vc, Tensor pos, int row0, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_cache_write(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) kc, Tensor(b!) vc, Tensor pos, int row0, "
        "int h) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(effroll, CPU, m) {
  m.impl("cache_attention", TORCH_BOX(&cache_attention));
  m.impl("rms_norm", TORCH_BOX(&rms_norm));
  m.impl("rope_cache_write", TORCH_BOX(&rope_cache_write));
  m.impl("silu_mul", TORCH_BOX(&silu_mul));
}
