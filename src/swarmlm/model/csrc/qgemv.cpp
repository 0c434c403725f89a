// Weight-only quantized matrix-vector products with dynamically quantized int8 activations, on
// AVX512-VNNI (vpdpbusd). The numbers are defined by the torch reference in model/qkernels.py;
// this file computes the very same ones faster (integer dot products are exact; every float
// step is the same IEEE operation in the same order: built with -ffp-contract=off).
//
// Weights are blocked by 16 output rows: one 64-byte vector holds 4 input columns of 16 rows,
// so one vpdpbusd with 4 broadcast activation bytes advances 16 dot products.
//   int8: w (Nb, K/4, 16, 4) int8; activations as unsigned (x + 128), corrected by 128 * rowsum.
//   int4: w (Nb, K/8, 16, 4) uint8: low nibble column 8j + t, high nibble column 8j + 4 + t;
//         per group of g columns a bfloat16 scale and low (w = q * scale + low), signed activations.
//         The high nibbles are multiplied in place (16 q: one mask, no shift) and their exact sum
//         shifted back once per group; a group's 8-column steps are unrolled (g = 32, 64, 128),
//         with four accumulators. The int4 kernel is bound by its instructions, not by memory: per
//         64 weights it needs the int8 kernel's one vpdpbusd plus the nibble mask and its share of
//         the group's float steps.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>

namespace {

// Row m of x (K floats) -> sx (its step) and K int8 values, exactly as qkernels.quantize_rows does:
// amax = max |x|; sx = amax / 127 (1 where amax is 0); q = clamp(round_half_even(x / sx), -127, 127).
void quantize_row(const float* x, int64_t K, int8_t* q, float* sx_out) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float amax = _mm512_reduce_max_ps(vmax);                 // a maximum: the order does not matter
  for (; k < K; ++k) amax = std::fmax(amax, std::fabs(x[k]));
  float sx = amax / 127.0f;
  if (sx == 0.f) sx = 1.0f;
  const __m512 vs = _mm512_set1_ps(sx), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (k = 0; k + 16 <= K; k += 16) {       // x / sx (IEEE division), rounded half to even, clamped
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  for (; k < K; ++k) {
    float v = std::nearbyint(x[k] / sx);           // the default rounding mode: half to even
    v = std::fmin(std::fmax(v, -127.f), 127.f);
    q[k] = static_cast<int8_t>(v);
  }
  *sx_out = sx;
}

int64_t grain_blocks(int64_t Nb, int64_t K, int64_t bytes_per_col16) {
  // a product reading less than ~256 KB of weights runs on the calling thread (a parallel region
  // costs more than it saves there); a larger one splits its rows evenly over torch's threads
  return Nb * K * bytes_per_col16 < (int64_t(1) << 18) ? std::max<int64_t>(1, Nb) : 1;
}

}  // namespace

// x (M, K) any float (used as float32), w (Nb, K/4, 16, 4) int8, scales (Nb*16) float32, rowsum (Nb*16) int32 -> (M, Nb*16) float32
torch::Tensor int8_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor rowsum) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x: (M, K) on the CPU");
  x = x.to(torch::kFloat32).contiguous();      // no copy when it already is
  TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 4 && w.size(2) == 16 && w.size(3) == 4 && w.is_contiguous(),
              "w: (Nb, K/4, 16, 4) int8");
  const int64_t M = x.size(0), K = x.size(1), Nb = w.size(0), K4 = w.size(1), N = Nb * 16;
  TORCH_CHECK(K == K4 * 4, "x's width must be the weight's");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.numel() == N && scales.is_contiguous(), "scales: (N,) float32");
  TORCH_CHECK(rowsum.dtype() == torch::kInt32 && rowsum.numel() == N && rowsum.is_contiguous(), "rowsum: (N,) int32");
  auto y = torch::empty({M, N}, x.options());
  std::vector<uint8_t> xu(M * K);
  std::vector<float> sx(M);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    quantize_row(xp + m * K, K, reinterpret_cast<int8_t*>(xu.data() + m * K), &sx[m]);
    for (int64_t k = 0; k < K; ++k) xu[m * K + k] ^= 0x80;   // int8 + 128 as uint8
  }
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const int32_t* rp = rowsum.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, Nb, grain_blocks(Nb, K, 16), [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const int8_t* wb = wp + nb * K4 * 64;
      const __m512i comp = _mm512_slli_epi32(_mm512_loadu_si512(rp + nb * 16), 7);   // 128 * rowsum
      const __m512 sc = _mm512_loadu_ps(sp + nb * 16);
      for (int64_t m = 0; m < M; ++m) {
        const uint8_t* xm = xu.data() + m * K;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        int64_t j = 0;
        for (; j + 4 <= K4; j += 4) {
          int32_t x0, x1, x2, x3;
          std::memcpy(&x0, xm + 4 * j, 4); std::memcpy(&x1, xm + 4 * j + 4, 4);
          std::memcpy(&x2, xm + 4 * j + 8, 4); std::memcpy(&x3, xm + 4 * j + 12, 4);
          a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(x0), _mm512_loadu_si512(wb + j * 64));
          a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(x1), _mm512_loadu_si512(wb + j * 64 + 64));
          a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(x2), _mm512_loadu_si512(wb + j * 64 + 128));
          a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(x3), _mm512_loadu_si512(wb + j * 64 + 192));
        }
        for (; j < K4; ++j) {
          int32_t x0;
          std::memcpy(&x0, xm + 4 * j, 4);
          a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(x0), _mm512_loadu_si512(wb + j * 64));
        }
        __m512i acc = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
        acc = _mm512_sub_epi32(acc, comp);
        // y = float(isum) * (sx * scale)
        const __m512 f = _mm512_mul_ps(_mm512_set1_ps(sx[m]), sc);
        _mm512_storeu_ps(yp + m * N + nb * 16, _mm512_mul_ps(_mm512_cvtepi32_ps(acc), f));
      }
    }
  });
  return y;
}

static inline __m512 load_bf16(const uint16_t* p) {   // 16 bfloat16 -> float32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// one block of 16 output rows of one input row: STEPS (group / 8) vectors per group, unrolled
template <int STEPS>
static inline __m512 int4_block(const uint8_t* __restrict wb, const uint16_t* __restrict sb, const uint16_t* __restrict lb,
                                const int8_t* __restrict xm, const float* __restrict xs, int64_t G, int64_t steps) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const int64_t S = STEPS ? STEPS : steps;
  __m512 accf = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* wg = wb + g * S * 64;
    const int8_t* xg = xm + g * S * 8;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t s = 0;
#pragma GCC unroll 8
    for (; s + 2 <= S; s += 2) {
      const __m512i v = _mm512_loadu_si512(wg + s * 64), u = _mm512_loadu_si512(wg + s * 64 + 64);
      int32_t x0, x1, x2, x3;
      std::memcpy(&x0, xg + 8 * s, 4); std::memcpy(&x1, xg + 8 * s + 4, 4);
      std::memcpy(&x2, xg + 8 * s + 8, 4); std::memcpy(&x3, xg + 8 * s + 12, 4);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v, nib), _mm512_set1_epi32(x0));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_andnot_si512(nib, v), _mm512_set1_epi32(x1));   // 16 * high nibble
      a2 = _mm512_dpbusd_epi32(a2, _mm512_and_si512(u, nib), _mm512_set1_epi32(x2));
      a3 = _mm512_dpbusd_epi32(a3, _mm512_andnot_si512(nib, u), _mm512_set1_epi32(x3));
    }
    for (; s < S; ++s) {
      const __m512i v = _mm512_loadu_si512(wg + s * 64);
      int32_t x0, x1;
      std::memcpy(&x0, xg + 8 * s, 4); std::memcpy(&x1, xg + 8 * s + 4, 4);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v, nib), _mm512_set1_epi32(x0));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_andnot_si512(nib, v), _mm512_set1_epi32(x1));
    }
    // the exact integer sum (a1 + a3 is 16 times the high nibbles' sum: the shift is exact)
    const __m512i isum = _mm512_add_epi32(_mm512_add_epi32(a0, a2), _mm512_srai_epi32(_mm512_add_epi32(a1, a3), 4));
    accf = _mm512_add_ps(accf, _mm512_mul_ps(_mm512_cvtepi32_ps(isum), load_bf16(sb + g * 16)));
    accf = _mm512_add_ps(accf, _mm512_mul_ps(load_bf16(lb + g * 16), _mm512_set1_ps(xs[g])));
  }
  return accf;
}

// x (M, K) float32, w (Nb, K/8, 16, 4) uint8, scales and lows (Nb, K/g, 16) bfloat16 -> (M, Nb*16) float32
torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor lows, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x: (M, K) on the CPU");
  x = x.to(torch::kFloat32).contiguous();
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 4 && w.size(2) == 16 && w.size(3) == 4 && w.is_contiguous(),
              "w: (Nb, K/8, 16, 4) uint8");
  const int64_t M = x.size(0), K = x.size(1), Nb = w.size(0), K8 = w.size(1), N = Nb * 16;
  TORCH_CHECK(K == K8 * 8 && group % 8 == 0 && K % group == 0, "x's width must be the weight's, in whole groups");
  const int64_t G = K / group, steps = group / 8;
  TORCH_CHECK(scales.dtype() == torch::kBFloat16 && scales.numel() == Nb * G * 16 && scales.is_contiguous(), "scales");
  TORCH_CHECK(lows.dtype() == torch::kBFloat16 && lows.numel() == Nb * G * 16 && lows.is_contiguous(), "lows");
  auto y = torch::empty({M, N}, x.options());
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M), xsum(M * G);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    quantize_row(xp + m * K, K, xq.data() + m * K, &sx[m]);
    for (int64_t g = 0; g < G; ++g) {
      int32_t s = 0;
      for (int64_t k = 0; k < group; ++k) s += xq[m * K + g * group + k];
      xsum[m * G + g] = static_cast<float>(s);
    }
  }
  const uint8_t* const wp = w.data_ptr<uint8_t>();
  const uint16_t* const sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
  const uint16_t* const lp = reinterpret_cast<const uint16_t*>(lows.data_ptr<at::BFloat16>());
  float* const yp = y.data_ptr<float>();
  const int8_t* const xqp = xq.data();
  const float* const sxp = sx.data();
  const float* const xsp = xsum.data();
  at::parallel_for(0, Nb, grain_blocks(Nb, K, 8), [=](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const uint8_t* wb = wp + nb * K8 * 64;
      const uint16_t* sb = sp + nb * G * 16;
      const uint16_t* lb = lp + nb * G * 16;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xm = xqp + m * K;
        const float* xs = xsp + m * G;
        __m512 accf;
        switch (steps) {
          case 4: accf = int4_block<4>(wb, sb, lb, xm, xs, G, steps); break;
          case 8: accf = int4_block<8>(wb, sb, lb, xm, xs, G, steps); break;
          case 16: accf = int4_block<16>(wb, sb, lb, xm, xs, G, steps); break;
          default: accf = int4_block<0>(wb, sb, lb, xm, xs, G, steps);
        }
        _mm512_storeu_ps(yp + m * N + nb * 16, _mm512_mul_ps(accf, _mm512_set1_ps(sxp[m])));
      }
    }
  });
  return y;
}

void bind_decode(pybind11::module& m);   // decode.cpp: the whole one-row decode step

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemm", &int8_gemm, "int8 weights (16-row blocks) x dynamically quantized int8 activations");
  m.def("int4_gemm", &int4_gemm, "int4 weights (16-row blocks, groups) x dynamically quantized int8 activations");
  bind_decode(m);
}
