// SPDX-License-Identifier: Apache-2.0
// Fragment, no include guard: the vector type and primitives of one SIMD level, defined in the
// namespace that includes it (dms/cpu/simd/{scalar,vec128,avx2,avx512}.hpp), inside that level's
// target region (simd/target.hpp). The includer defines
//   DMS_CPU_W    float lanes per vector: 1, 4, 8 or 16
//   DMS_CPU_ISA  which intrinsics may be used: 0 none (portable), 2 AVX2 + F16C, 3 AVX-512
// and has included <bit>, <cstdint>, <cstring>, <type_traits>, dms/numeric.hpp and
// simd/target.hpp. Everything is always_inline: the kernels of the same region inline it.
//
// Widths above 1 use the GCC/Clang vector extensions, so one source serves every width and the
// compiler picks the instructions of the region's target (SSE2 / NEON at 4 lanes, AVX2 at 8,
// AVX-512 at 16). Width 1 is plain C++ and builds with any compiler.

inline constexpr int width = DMS_CPU_W;

#if DMS_CPU_W == 1
using vf = float;
using vu = std::uint32_t;
using vi = std::int32_t;
#else
typedef float vf __attribute__((vector_size(4 * DMS_CPU_W)));
typedef std::uint32_t vu __attribute__((vector_size(4 * DMS_CPU_W)));
typedef std::int32_t vi __attribute__((vector_size(4 * DMS_CPU_W)));
#endif

// ---- basics ------------------------------------------------------------------------------

DMS_CPU_INLINE vf zero() {
  return vf{};
}
/// x in every lane. x - 0 is exactly x (also -0), so this is a plain broadcast.
DMS_CPU_INLINE vf set1(float x) {
  return x - vf{};
}
DMS_CPU_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
DMS_CPU_INLINE void store(float* p, vf v) {
  std::memcpy(p, &v, sizeof v);
}
/// 4 * width raw bytes as 32-bit lanes.
DMS_CPU_INLINE vu load_u(const void* p) {
  vu v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
#if DMS_CPU_W == 1
DMS_CPU_INLINE vf as_f(vu u) {
  return std::bit_cast<float>(u);
}
DMS_CPU_INLINE vu as_u(vf f) {
  return std::bit_cast<std::uint32_t>(f);
}
DMS_CPU_INLINE vf to_float(vu u) {
  return float(std::int32_t(u));
}
#else
DMS_CPU_INLINE vf as_f(vu u) {
  return (vf)u;
}
DMS_CPU_INLINE vu as_u(vf f) {
  return (vu)f;
}
/// Lanes holding non-negative values below 2^31, converted to float.
DMS_CPU_INLINE vf to_float(vu u) {
  return __builtin_convertvector((vi)u, vf);
}
#endif

/// a * b + c; fused where the region's target has FMA (GCC and Clang contract it).
DMS_CPU_INLINE vf madd(vf a, vf b, vf c) {
  return a * b + c;
}
DMS_CPU_INLINE vf vmax(vf a, vf b) {
  return a > b ? a : b;
}
DMS_CPU_INLINE vf vmin(vf a, vf b) {
  return a < b ? a : b;
}
/// a < b ? x : y, lane by lane.
DMS_CPU_INLINE vf select_lt(vf a, vf b, vf x, vf y) {
  return a < b ? x : y;
}

DMS_CPU_INLINE vi load_i(const std::int32_t* p) {
  vi v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
DMS_CPU_INLINE vi set1_i(std::int32_t x) {
  return x - vi{};
}
/// Lanes where lo <= t <= hi keep x, the others get y.
DMS_CPU_INLINE vf select_within(vi lo, vi hi, vi t, vf x, vf y) {
  return ((lo <= t) & (t <= hi)) ? x : y;
}

// ---- horizontal --------------------------------------------------------------------------

DMS_CPU_INLINE float reduce_add(vf v) {
#if DMS_CPU_W == 1
  return v;
#elif DMS_CPU_W == 4
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2);
  return v[0];
#elif DMS_CPU_W == 8
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
#elif DMS_CPU_W == 16
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
#else
#error "DMS_CPU_W must be 1, 4, 8 or 16"
#endif
}

DMS_CPU_INLINE float reduce_max(vf v) {
#if DMS_CPU_W == 1
  return v;
#elif DMS_CPU_W == 4
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2));
  return v[0];
#elif DMS_CPU_W == 8
  v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
  return v[0];
#else
  v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
#endif
}

/// out[i] = the sum of the lanes of v[i], for i < width: `width` horizontal sums at once, by a
/// tree of in-lane pairwise adds (2 shuffles + 1 add per step), about a third of the operations
/// of reducing the vectors one by one.
DMS_CPU_INLINE void transpose_sums(const vf* v, float* out) {
#if DMS_CPU_W == 1
  out[0] = v[0];
#elif DMS_CPU_W == 4
  const auto pair = [](vf a, vf b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6) + __builtin_shufflevector(a, b, 1, 3, 5, 7);
  };
  store(out, pair(pair(v[0], v[1]), pair(v[2], v[3])));
#elif DMS_CPU_W == 8
  // In-lane pairs (vshufps): after two steps each 128-bit half holds 4 vectors' half sums.
  const auto pair = [](vf a, vf b) {
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const vf lo = pair(pair(v[0], v[1]), pair(v[2], v[3]));
  const vf hi = pair(pair(v[4], v[5]), pair(v[6], v[7]));
  store(out, __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
                 __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15));
#elif DMS_CPU_W == 16
  // A tree of two-source shuffles on whole vectors, each level halving their number (2 shuffles
  // + 1 add per pair: 45 operations, against 74 when each vector is first folded to 8 lanes).
  // The inputs go in bit-reversed order, so that the sums come out in natural order.
  constexpr int rev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  vf l1[8], l2[4], l3[2];
  DMS_CPU_UNROLL
  for (int i = 0; i < 8; ++i) {  // lanes 0-7: 8 partial sums of one vector, 8-15: of the other
    const vf a = v[rev[2 * i]], b = v[rev[2 * i + 1]];
    l1[i] =
        __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
        __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  DMS_CPU_UNROLL
  for (int i = 0; i < 4; ++i) {  // 4 lanes per vector
    const vf a = l1[2 * i], b = l1[2 * i + 1];
    l2[i] =
        __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
        __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  }
  DMS_CPU_UNROLL
  for (int i = 0; i < 2; ++i) {  // 2 lanes per vector
    const vf a = l2[2 * i], b = l2[2 * i + 1];
    l3[i] =
        __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
        __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  store(out, __builtin_shufflevector(l3[0], l3[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12,
                                     28, 14, 30) +
                 __builtin_shufflevector(l3[0], l3[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27,
                                         13, 29, 15, 31));
#endif
}

// ---- exp ---------------------------------------------------------------------------------

/// e^x to about 2 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r,
/// 2^n from the exponent bits). Exactly 0 below ln(2^-126) (so -inf, the mask value, gives 0);
/// inputs above 88 are clamped to 88.
DMS_CPU_INLINE vf exp(vf x) {
  const vf lo = set1(-87.33654475f), hi = set1(88.0f);
  const vf xc = vmin(vmax(x, lo), hi);
  // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits.
  const vf magic = set1(12582912.0f);
  const vf t = madd(xc, set1(1.44269504088896341f), magic);
  const vf n = t - magic;
  vf r = madd(n, set1(-0.693359375f), xc);  // ln2 in two parts: r = x - n ln2 without loss
  r = madd(n, set1(2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = madd(p, r, set1(1.3981999507e-3f));
  p = madd(p, r, set1(8.3334519073e-3f));
  p = madd(p, r, set1(4.1665795894e-2f));
  p = madd(p, r, set1(1.6666665459e-1f));
  p = madd(p, r, set1(5.0000001201e-1f));
  p = madd(p, r * r, r + set1(1.0f));
  const vu two_n = (as_u(t) - as_u(magic) + 127u) << 23;  // n in [-126, 127]: a normal 2^n
  return select_lt(x, lo, zero(), p * as_f(two_n));
}

// ---- K/V loads: 2 * width elements of the storage type as two float vectors --------------

/// How load_pair lays out a chunk of 2 * width elements: false = (elements [0, W), [W, 2W)),
/// true = (even elements, odd elements). 16-bit types are split into even and odd by a shift
/// and a mask of 32-bit lanes, which costs one instruction per vector instead of a widening
/// shuffle; the queries and outputs of a chunk are permuted the same way once per call.
template <class T>
inline constexpr bool pair_interleaved =
    !std::is_same_v<T, float> && !(DMS_CPU_ISA >= 2 && std::is_same_v<T, half>);

/// Index within a chunk's (a, b) layout of element e (0 <= e < 2 * width) of the chunk.
template <class T>
constexpr int pair_lane(int e) {
  if constexpr (pair_interleaved<T>) {
    return (e % 2 == 0 ? 0 : width) + e / 2;
  } else {
    return e;
  }
}

DMS_CPU_INLINE void load_pair(const float* p, vf& a, vf& b) {
  a = load(p);
  b = load(p + width);
}

DMS_CPU_INLINE void load_pair(const bfloat16* p, vf& a, vf& b) {
  const vu u = load_u(p);  // lane i: element 2i in the low half, 2i + 1 in the high half
  a = as_f(u << 16);
  b = as_f(u & 0xffff0000u);
}

/// IEEE binary16 bits (low 16 bits of each lane) to float, exactly as
/// dms::detail::half_bits_to_float: normals rebias by a multiply by 2^112 (exact), subnormals
/// are m * 2^-24 (exact, and independent of denormals-are-zero modes), inf/NaN keep the payload.
DMS_CPU_INLINE vf half_bits_to_float(vu h) {
  const vu em = h & 0x7fffu;
  const vu sign = (h & 0x8000u) << 16;
  const vf normal = as_f(em << 13) * set1(0x1p112f);
  const vf subnormal = to_float(em) * set1(0x1p-24f);
  const vf special = as_f((em << 13) | 0x7f800000u);
  vf f = em < 0x0400u ? subnormal : normal;
  f = em >= 0x7c00u ? special : f;
  return as_f(as_u(f) | sign);
}

DMS_CPU_INLINE void load_pair(const half* p, vf& a, vf& b) {
#if DMS_CPU_ISA == 2
  a = (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  b = (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + width)));
#elif DMS_CPU_ISA == 3
  // The zero-masked form: GCC 12 warns (-Wmaybe-uninitialized) about the plain one's undefined
  // pass-through operand.
  a = (vf)_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  b = (vf)_mm512_maskz_cvtph_ps(0xffff,
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + width)));
#else
  const vu u = load_u(p);
  a = half_bits_to_float(u & 0xffffu);
  b = half_bits_to_float(u >> 16);
#endif
}

/// The first n (< 2 * width) elements at p, zero-filled: reads nothing past p + n.
template <class T>
DMS_CPU_INLINE void load_pair_partial(const T* p, int n, vf& a, vf& b) {
  T buf[2 * width] = {};
  std::memcpy(buf, p, sizeof(T) * std::size_t(n));
  load_pair(buf, a, b);
}

/// dst[i] = float(src[i]) for i < n, in natural order. Not always_inline: an ordinary function of
/// the level, callable from any code (tests check every level's conversions through it, and
/// prefill widens its key and value blocks with it).
template <class T>
inline void widen(const T* DMS_CPU_RESTRICT src, int n, float* DMS_CPU_RESTRICT dst) noexcept {
  constexpr int cw = 2 * width;
  alignas(64) float a_b[cw];
  int i = 0;
  for (; i + cw <= n; i += cw) {
    vf a, b;
    load_pair(src + i, a, b);
    if constexpr (pair_interleaved<T>) {
      store(a_b, a);
      store(a_b + width, b);
      for (int e = 0; e < cw; ++e) dst[i + e] = a_b[pair_lane<T>(e)];
    } else {
      store(dst + i, a);
      store(dst + i + width, b);
    }
  }
  if (i < n) {
    vf a, b;
    load_pair_partial(src + i, n - i, a, b);
    store(a_b, a);
    store(a_b + width, b);
    for (int e = 0; e < n - i; ++e) dst[i + e] = a_b[pair_lane<T>(e)];
  }
}

/// y[i] = exp(x[i]) for i < n, through the vector exp (tests check its accuracy per level).
inline void exp_array(const float* DMS_CPU_RESTRICT x, int n, float* DMS_CPU_RESTRICT y) noexcept {
  int i = 0;
  for (; i + width <= n; i += width) store(y + i, exp(load(x + i)));
  if (i < n) {
    alignas(64) float in[width] = {}, res[width];
    std::memcpy(in, x + i, sizeof(float) * std::size_t(n - i));
    store(res, exp(load(in)));
    std::memcpy(y + i, res, sizeof(float) * std::size_t(n - i));
  }
}
