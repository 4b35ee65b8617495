// mlora's CPU LoRA shrink/expand for short adapter segments (decode): plain C++ (GCC/Clang vector
// extensions, no torch headers), built once per machine by kernels/native.py at -O3 -march=native and
// called through ctypes.
//
// Why: a decode step runs 168 tiny LoRA matmuls (12 layers x 7 modules x shrink + expand) and each torch
// (oneDNN/MKL) call has a fixed cost of ~15-30 us whatever its size, more than reading the adapter takes
// (a rank-16 A of 768 columns is 24 KB in bf16). These loops read each segment's adapter rows once per
// block of up to 4 rows, keep the block's sums in vector registers, accumulate in fp32 and round once to
// the activation dtype.
//
// Layout (as kernels/cpu.py): rows are visited in `sorted_rows` order, segment g = sorted_rows[start:end]
// with slot `slot` and rank `rank` (columns of h / rows of A past it are zero and skipped).
//   seg:    [nseg, 4] int64 (start, end, slot, rank)
//   shrink: h[row, j] = scale[slot] * sum_k x[row, k] * A[slot, j, k]    (j < rank; h[row, rank:R] = 0)
//   expand: out[row, n] = out[row, n] + sum_{j < rank} h[row, j] * B[slot, j, n]   (B rank-major: n stride 1)
// Each row's arithmetic depends only on that row and the sizes (the same bits alone or in any batch).
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace {

typedef uint16_t bf16;
#if defined(__AVX512F__)
constexpr int V = 16;  // lanes of one float vector: one register of the widest ISA compiled for
#elif defined(__AVX__)
constexpr int V = 8;
#else
constexpr int V = 4;  // SSE, NEON and the rest
#endif
typedef float vf __attribute__((vector_size(V * 4)));
typedef uint32_t vu __attribute__((vector_size(V * 4)));
typedef int32_t vi __attribute__((vector_size(V * 4)));
typedef uint16_t vh __attribute__((vector_size(V * 2)));

inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const bf16* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(bf16* p, int64_t i, float v) {  // round to nearest even; NaN stays NaN (as torch's .to(bfloat16))
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p[i] = static_cast<bf16>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p[i] = static_cast<bf16>(u >> 16);
}

inline vf vld(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf vld(const bf16* p) {
#if defined(__AVX512F__) && defined(__AVX512BW__)  // one widening load and a shift (GCC 12 splits the generic form)
  const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return (vf)_mm512_castsi512_ps(w);
#else
  vh raw;
  std::memcpy(&raw, p, sizeof raw);
  vu w = __builtin_convertvector(raw, vu) << 16;
  vf v;
  std::memcpy(&v, &w, sizeof v);
  return v;
#endif
}
inline void vst(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void vst(bf16* p, vf v) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512i u = _mm512_castps_si512((__m512)v);
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  const __m512i r = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
#else
  vu u;
  std::memcpy(&u, &v, sizeof u);
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu nan = (u >> 16) | 0x40u;
  const vu r = ((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded;
  const vh out = __builtin_convertvector(r, vh);
  std::memcpy(p, &out, sizeof out);
#endif
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < V; ++i) s += v[i];
  return s;
}

constexpr int JB = 4;  // shrink: rank rows per register block

// One block of NB rows (fp32 copies xr[0..NB) of x's rows) of a shrink: hr[r][j] for j < rank.
template <class T, int NB>
void shrink_block(const float* const* xr, const T* a, int64_t a_rs, int64_t K, int64_t rank, float scale, T* const* hr) {
  const int64_t kv = K - K % V;
  int64_t j = 0;
  for (; j + JB <= rank; j += JB) {
    vf acc[NB][JB] = {};
    for (int64_t k = 0; k < kv; k += V) {
      vf av[JB];
      for (int q = 0; q < JB; ++q) av[q] = vld(a + (j + q) * a_rs + k);
      for (int r = 0; r < NB; ++r) {
        const vf xv = vld(xr[r] + k);
        for (int q = 0; q < JB; ++q) acc[r][q] += xv * av[q];
      }
    }
    for (int r = 0; r < NB; ++r)
      for (int q = 0; q < JB; ++q) {
        float s = hsum(acc[r][q]);
        for (int64_t k = kv; k < K; ++k) s += xr[r][k] * ld(a + (j + q) * a_rs, k);
        st(hr[r], j + q, scale * s);
      }
  }
  for (; j < rank; ++j) {
    vf acc[NB] = {};
    for (int64_t k = 0; k < kv; k += V) {
      const vf av = vld(a + j * a_rs + k);
      for (int r = 0; r < NB; ++r) acc[r] += vld(xr[r] + k) * av;
    }
    for (int r = 0; r < NB; ++r) {
      float s = hsum(acc[r]);
      for (int64_t k = kv; k < K; ++k) s += xr[r][k] * ld(a + j * a_rs, k);
      st(hr[r], j, scale * s);
    }
  }
}

// expand: vectors of output columns per register block: NB x NV accumulators and NV weight vectors stay in
// registers (32 with AVX-512, so 2 rows take 8 vectors = 128 columns; 16 with AVX2)
template <int NB>
constexpr int expand_nv() { return (V == 16 && NB <= 2) ? 8 : 4; }

// One block of NB rows of an expand: orow[r][n] += sum_j hc[r * rank + j] * b[j, n] (hc: the rows' h in fp32).
template <class T, int NB>
void expand_block(const float* hc, const T* b, int64_t b_js, int64_t N, int64_t rank, T* const* orow) {
  constexpr int NV = expand_nv<NB>();
  constexpr int64_t W = NV * V;
  const int64_t nw = N - N % W;
  for (int64_t n0 = 0; n0 < nw; n0 += W) {
    vf acc[NB][NV];
    for (int r = 0; r < NB; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = vld(orow[r] + n0 + v * V);
    for (int64_t j = 0; j < rank; ++j) {
      vf bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = vld(b + j * b_js + n0 + v * V);
      for (int r = 0; r < NB; ++r) {
        const float c = hc[r * rank + j];
        for (int v = 0; v < NV; ++v) acc[r][v] += c * bv[v];
      }
    }
    for (int r = 0; r < NB; ++r)
      for (int v = 0; v < NV; ++v) vst(orow[r] + n0 + v * V, acc[r][v]);
  }
  for (int r = 0; r < NB; ++r)  // the last N % W columns
    for (int64_t n = nw; n < N; ++n) {
      float s = ld(orow[r], n);
      for (int64_t j = 0; j < rank; ++j) s += hc[r * rank + j] * ld(b + j * b_js, n);
      st(orow[r], n, s);
    }
}

constexpr int BR = 4;  // rows per block

inline float* scratch(size_t n) {  // per-thread fp32 scratch, grown as needed, freed with the thread
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

template <class T>
void shrink(const T* x, int64_t x_rs, const int64_t* rows, const int64_t* seg, int64_t nseg, const T* a,
            int64_t a_ss, int64_t a_rs, int64_t K, const float* scales, int64_t sc_s, T* h, int64_t h_rs, int64_t R) {
  float* xbuf = scratch(static_cast<size_t>(BR * K));
  for (int64_t g = 0; g < nseg; ++g) {
    const int64_t start = seg[4 * g], end = seg[4 * g + 1], slot = seg[4 * g + 2], rank = seg[4 * g + 3];
    const float scale = scales[slot * sc_s];
    const T* as = a + slot * a_ss;
    for (int64_t b = start; b < end; b += BR) {
      const int nb = static_cast<int>(end - b < BR ? end - b : BR);
      const float* xr[BR];
      T* hr[BR];
      for (int r = 0; r < nb; ++r) {
        const T* src = x + rows[b + r] * x_rs;
        if constexpr (sizeof(T) == sizeof(float)) {
          xr[r] = reinterpret_cast<const float*>(src);
        } else {  // widen the row once, not once per block of rank rows
          float* dst = xbuf + r * K;
          for (int64_t k = 0; k < K; ++k) dst[k] = ld(src, k);
          xr[r] = dst;
        }
        hr[r] = h + rows[b + r] * h_rs;
      }
      switch (nb) {
        case 1: shrink_block<T, 1>(xr, as, a_rs, K, rank, scale, hr); break;
        case 2: shrink_block<T, 2>(xr, as, a_rs, K, rank, scale, hr); break;
        case 3: shrink_block<T, 3>(xr, as, a_rs, K, rank, scale, hr); break;
        default: shrink_block<T, 4>(xr, as, a_rs, K, rank, scale, hr); break;
      }
      for (int r = 0; r < nb; ++r)
        for (int64_t j = rank; j < R; ++j) st(hr[r], j, 0.f);
    }
  }
}

template <class T>
void expand(const T* h, int64_t h_rs, const int64_t* rows, const int64_t* seg, int64_t nseg, const T* bm,
            int64_t b_ss, int64_t b_js, int64_t N, T* out, int64_t o_rs) {
  int64_t max_rank = 0;
  for (int64_t g = 0; g < nseg; ++g) max_rank = seg[4 * g + 3] > max_rank ? seg[4 * g + 3] : max_rank;
  float* hc = scratch(static_cast<size_t>(BR * max_rank));
  for (int64_t g = 0; g < nseg; ++g) {
    const int64_t start = seg[4 * g], end = seg[4 * g + 1], slot = seg[4 * g + 2], rank = seg[4 * g + 3];
    const T* bs = bm + slot * b_ss;
    for (int64_t b = start; b < end; b += BR) {
      const int nb = static_cast<int>(end - b < BR ? end - b : BR);
      T* orow[BR];
      for (int r = 0; r < nb; ++r) {
        const T* hrow = h + rows[b + r] * h_rs;
        for (int64_t j = 0; j < rank; ++j) hc[r * rank + j] = ld(hrow, j);
        orow[r] = out + rows[b + r] * o_rs;
      }
      switch (nb) {
        case 1: expand_block<T, 1>(hc, bs, b_js, N, rank, orow); break;
        case 2: expand_block<T, 2>(hc, bs, b_js, N, rank, orow); break;
        case 3: expand_block<T, 3>(hc, bs, b_js, N, rank, orow); break;
        default: expand_block<T, 4>(hc, bs, b_js, N, rank, orow); break;
      }
    }
  }
}

}  // namespace

extern "C" {

// One int64 argument block per call (ctypes converts one pointer instead of 15 arguments: ~2 us, not ~15).
// shrink p: dtype, x, x_rs, rows, seg, nseg, a, a_ss, a_rs, K, scales, sc_s, h, h_rs, R
// expand p: dtype, h, h_rs, rows, seg, nseg, b, b_ss, b_js, N, out, o_rs
// dtype: 0 = float32, 1 = bfloat16 (x, A, h, B, out share it; scales are float32); pointers as integers.
#define PTR(T, i) reinterpret_cast<T>(static_cast<intptr_t>(p[i]))

int mlora_shrink(const int64_t* p) {
  const int64_t* rows = PTR(const int64_t*, 3);
  const int64_t* seg = PTR(const int64_t*, 4);
  const float* scales = PTR(const float*, 10);
  if (p[0] == 0)
    shrink(PTR(const float*, 1), p[2], rows, seg, p[5], PTR(const float*, 6), p[7], p[8], p[9], scales, p[11],
           PTR(float*, 12), p[13], p[14]);
  else if (p[0] == 1)
    shrink(PTR(const bf16*, 1), p[2], rows, seg, p[5], PTR(const bf16*, 6), p[7], p[8], p[9], scales, p[11],
           PTR(bf16*, 12), p[13], p[14]);
  else
    return 1;
  return 0;
}

int mlora_expand(const int64_t* p) {
  const int64_t* rows = PTR(const int64_t*, 3);
  const int64_t* seg = PTR(const int64_t*, 4);
  if (p[0] == 0)
    expand(PTR(const float*, 1), p[2], rows, seg, p[5], PTR(const float*, 6), p[7], p[8], p[9], PTR(float*, 10), p[11]);
  else if (p[0] == 1)
    expand(PTR(const bf16*, 1), p[2], rows, seg, p[5], PTR(const bf16*, 6), p[7], p[8], p[9], PTR(bf16*, 10), p[11]);
  else
    return 1;
  return 0;
}

// n blocks back to back (a fused projection's slices: q/k/v, gate/up) in one call
int mlora_shrink_n(const int64_t* p, int64_t n) {
  int rc = 0;
  for (int64_t i = 0; i < n; ++i) rc |= mlora_shrink(p + 15 * i);
  return rc;
}

int mlora_expand_n(const int64_t* p, int64_t n) {
  int rc = 0;
  for (int64_t i = 0; i < n; ++i) rc |= mlora_expand(p + 12 * i);
  return rc;
}

int mlora_abi_version(void) { return 4; }

// float lanes per vector this build uses (16 AVX-512, 8 AVX/AVX2, 4 otherwise)
int mlora_vector_lanes(void) { return V; }
}
