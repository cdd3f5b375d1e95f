/* diffusers-sdnq: one-pass decode of packed SDNQ codes into float rows (Apache-2.0).
 *
 * Compiled on first use by layers/native.py (a C compiler is optional: without one the torch path runs).
 * For value v of a weight stored as codes of `bits` bits:
 *
 *     x = code(v) + qmin                              exact in float32 for the widths handled here
 *     x = lut[code(v)]                                float codes: the table of all 2**bits decoded values
 *     w = x * scale[v / group]                        no zero point
 *     w = fma(x, scale[g], zero_point[g])             zero point, FUSED=1 (one rounding, like torch.addcmul on
 *                                                     CPUs with FMA); FUSED=0 rounds the product, then the sum
 *
 * Codes are read through the width's segment table (value k of a chunk holds bits lo..lo+n-1 at bits pos..
 * of unit u), generated from format/packing.py so the table lives in one place. Widths 4 and 8 have direct
 * loops because they are most of the Hub's checkpoints; on CPUs with AVX-512 they are decoded 16 values at a
 * time straight into float32 or bfloat16 (same operations per value, so the same bits). The caller checks every
 * size; this file trusts them.
 */
#include <stddef.h>
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SDNQ_AVX512 1
#include <immintrin.h>
#else
#define SDNQ_AVX512 0
#endif

#ifndef FUSED
#define FUSED 1
#endif

#define TILE 4096 /* values decoded per inner pass: a multiple of every chunk size, 16 KB of int32 codes */

/* The generated header (layers/native.py writes it from format/packing.py's LAYOUTS) defines, per packed width B:
 * SEGS_B (k, lo, n, u, pos rows), NSEG_B, VPC_B values per chunk, UPC_B units per chunk, UNIT_B (uint8_t or
 * uint16_t), and SDNQ_WIDTHS(X) calling X(B) for each width. Constant tables let the compiler unroll each
 * width's shifts and masks into straight-line code. */
#include "sdnq_segments.h"

#define UNPACK_FN(B)                                                                                         \
    static void unpack_##B(const uint8_t *bytes, int64_t first, int64_t count, int32_t *codes)              \
    {                                                                                                        \
        const UNIT_##B *units = (const UNIT_##B *)bytes;                                                     \
        const int64_t chunk0 = first / VPC_##B, chunks = count / VPC_##B;                                     \
        for (int64_t c = 0; c < chunks; c++) {                                                               \
            const UNIT_##B *p = units + (chunk0 + c) * UPC_##B;                                              \
            int32_t vals[VPC_##B] = {0};                                                                     \
            _Pragma("GCC unroll 64") for (int s = 0; s < NSEG_##B; s++) {                                    \
                const uint32_t unit = p[SEGS_##B[s][3]];                                                     \
                vals[SEGS_##B[s][0]] |=                                                                      \
                    (int32_t)(((unit >> SEGS_##B[s][4]) & ((1u << SEGS_##B[s][2]) - 1u)) << SEGS_##B[s][1]); \
            }                                                                                                \
            _Pragma("GCC unroll 16") for (int k = 0; k < VPC_##B; k++) codes[c * VPC_##B + k] = vals[k];     \
        }                                                                                                    \
    }
SDNQ_WIDTHS(UNPACK_FN)

static void unpack_tile(const uint8_t *units8, int64_t first, int64_t count, int bits, int32_t *codes)
{
    if (bits == 8) {
        for (int64_t i = 0; i < count; i++) codes[i] = units8[first + i];
        return;
    }
    if (bits == -8) { /* int8 stored as two's complement (torch.int8 weights) */
        for (int64_t i = 0; i < count; i++) codes[i] = (int8_t)units8[first + i];
        return;
    }
    if (bits == 4) { /* the Hub's most common width: two codes per byte, low nibble first */
        const uint8_t *p = units8 + first / 2;
        for (int64_t i = 0; i < count / 2; i++) {
            codes[2 * i] = p[i] & 15;
            codes[2 * i + 1] = p[i] >> 4;
        }
        return;
    }
    switch (bits) {
#define CASE(B)                                  \
    case B:                                      \
        unpack_##B(units8, first, count, codes); \
        return;
        SDNQ_WIDTHS(CASE)
#undef CASE
    }
}

static inline uint16_t to_bf16(float f)
{
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as torch converts it */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static void decode_tile(const uint8_t *units, int64_t first, int64_t n, int bits, int32_t qmin, const float *lut,
                        const float *scale, const float *zero_point, int64_t group, float *dst)
{
    int32_t codes[TILE];
    unpack_tile(units, first, n, bits, codes);
    if (lut) { /* float codes: the value of each code comes from the table, then it is scaled like an integer */
        for (int64_t i = 0; i < n; i++) dst[i] = lut[codes[i]];
    }
    int64_t j = 0;
    while (j < n) { /* one run of values sharing a scale (and zero point) at a time: a vectorizable loop */
        const int64_t g = (first + j) / group;
        int64_t stop = (g + 1) * group - first;
        if (stop > n) stop = n;
        const float s = scale[g];
        if (zero_point) {
            const float z = zero_point[g];
            for (int64_t i = j; i < stop; i++) {
                const float x = lut ? dst[i] : (float)(codes[i] + qmin);
#if FUSED
                dst[i] = __builtin_fmaf(x, s, z);
#else
                const float p = x * s;
                dst[i] = p + z;
#endif
            }
        } else if (lut) {
            for (int64_t i = j; i < stop; i++) dst[i] *= s;
        } else {
            for (int64_t i = j; i < stop; i++) dst[i] = (float)(codes[i] + qmin) * s;
        }
        j = stop;
    }
}

#if SDNQ_AVX512
/* Widths 4, 8 (unsigned bytes) and -8 (two's-complement bytes), integer codes: one pass from the stored bytes to
 * the output, 16 values per step. Per value it is the arithmetic of decode_tile (code + qmin converted exactly,
 * times the scale, plus the zero point with or without fusing) and the float32 -> bfloat16 rounding of to_bf16. */
static inline __m512i codes16(const uint8_t *units, int64_t v, int bits)
{
    if (bits == 4) { /* v even: 8 bytes hold 16 codes, low nibble first */
        const __m128i b = _mm_loadl_epi64((const __m128i *)(units + v / 2));
        const __m128i nib = _mm_set1_epi8(15);
        const __m128i lo = _mm_and_si128(b, nib), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
        return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
    }
    const __m128i b = _mm_loadu_si128((const __m128i *)(units + v));
    return bits == -8 ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
}

static inline int32_t code_at(const uint8_t *units, int64_t v, int bits)
{
    if (bits == 4) return (units[v >> 1] >> ((v & 1) << 2)) & 15;
    return bits == -8 ? (int32_t)(int8_t)units[v] : (int32_t)units[v];
}

static inline __m256i bf16x16(__m512 w)
{
    const __m512i u = _mm512_castps_si512(w);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                 _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
}

static inline float combine1(float x, float s, const float *zero_point, float z)
{
    if (!zero_point) return x * s;
#if FUSED
    return __builtin_fmaf(x, s, z);
#else
    const float p = x * s;
    return p + z;
#endif
}

/* 4-bit codes through a 16-entry table per scale: a scale's 16 possible values are computed once with the per-value
 * arithmetic (so they are the same bits), then looked up 16 (float32) or 32 (bfloat16) at a time. The tables of
 * all scales a tile touches are built first, in a loop of independent iterations (building one table is a chain of
 * dependent instructions: built one by one, next to their lookups, they cost as much as the lookups themselves). */
#define MAX_TABLES (TILE / 16 + 2)

static inline __m512 table16(int32_t qmin, float s, const float *zero_point, float z)
{
    const __m512 k = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3,
                                                                        2, 1, 0)), _mm512_set1_ps((float)qmin));
    if (!zero_point) return _mm512_mul_ps(k, _mm512_set1_ps(s));
#if FUSED
    return _mm512_fmadd_ps(k, _mm512_set1_ps(s), _mm512_set1_ps(z));
#else
    return _mm512_add_ps(_mm512_mul_ps(k, _mm512_set1_ps(s)), _mm512_set1_ps(z));
#endif
}

/* Values [first, first + n) of 4-bit codes, first and group even (so every run starts on a byte); returns 0, or 1
 * when the tile touches too many scales. */
static int decode4_tables(const uint8_t *units, int64_t first, int64_t n, int32_t qmin, const float *scale,
                          const float *zero_point, int64_t group, void *out, int out_bf16)
{
    const int64_t g0 = first / group, g1 = (first + n - 1) / group, count = g1 - g0 + 1;
    if (count > MAX_TABLES) return 1;
    __m512 tf[out_bf16 ? 1 : MAX_TABLES];
    __m256i tb[out_bf16 ? MAX_TABLES : 1];
    for (int64_t g = 0; g < count; g++) {
        const __m512 t = table16(qmin, scale[g0 + g], zero_point, zero_point ? zero_point[g0 + g] : 0.0f);
        if (out_bf16) tb[g] = bf16x16(t); else tf[g] = t;
    }
    const __m512i nib = _mm512_set1_epi32(15), high = _mm512_set1_epi32(0xf0);
    int64_t j = 0, g = 0, boundary = (g0 + 1) * group - first;
    while (j < n) {
        const int64_t stop = boundary < n ? boundary : n;
        int64_t i = j;
        if (out_bf16) {
            const __m512i words = _mm512_castsi256_si512(tb[g]);
            uint16_t *o = (uint16_t *)out;
            for (; i + 32 <= stop; i += 32) { /* 16 bytes -> 32 codes, a byte's two codes in one 32-bit lane */
                const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(units + (first + i) / 2)));
                const __m512i idx = _mm512_or_si512(_mm512_and_si512(d, nib),
                                                    _mm512_slli_epi32(_mm512_and_si512(d, high), 12));
                _mm512_storeu_si512((void *)(o + i), _mm512_permutexvar_epi16(idx, words));
            }
            for (; i < stop; i++) o[i] = ((const uint16_t *)&tb[g])[code_at(units, first + i, 4)];
        } else {
            float *o = (float *)out;
            for (; i + 16 <= stop; i += 16)
                _mm512_storeu_ps(o + i, _mm512_permutexvar_ps(codes16(units, first + i, 4), tf[g]));
            for (; i < stop; i++) o[i] = ((const float *)&tf[g])[code_at(units, first + i, 4)];
        }
        j = stop;
        g++;
        boundary += group;
    }
    return 0;
}

static void decode_tile_simd(const uint8_t *units, int64_t first, int64_t n, int bits, int32_t qmin,
                             const float *scale, const float *zero_point, int64_t group, void *out, int out_bf16)
{
    float *of = (float *)out;
    uint16_t *ob = (uint16_t *)out;
    if (bits == 4 && group % 2 == 0 && !(first & 1) &&
        decode4_tables(units, first, n, qmin, scale, zero_point, group, out, out_bf16) == 0)
        return;
    const __m512i q = _mm512_set1_epi32(qmin);
    int64_t g = first / group, boundary = (g + 1) * group - first; /* no division per run */
    int64_t j = 0;
    while (j < n) {
        const int64_t stop = boundary < n ? boundary : n;
        const float s = scale[g], z = zero_point ? zero_point[g] : 0.0f;
        const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
        int64_t i = j;
        for (; i < stop && bits == 4 && ((first + i) & 1); i++) { /* a run starting mid-byte */
            const float w = combine1((float)(code_at(units, first + i, bits) + qmin), s, zero_point, z);
            if (out_bf16) ob[i] = to_bf16(w); else of[i] = w;
        }
        for (; i + 16 <= stop; i += 16) {
            const __m512 x = _mm512_cvtepi32_ps(_mm512_add_epi32(codes16(units, first + i, bits), q));
            __m512 w;
            if (!zero_point) w = _mm512_mul_ps(x, vs);
#if FUSED
            else w = _mm512_fmadd_ps(x, vs, vz);
#else
            else w = _mm512_add_ps(_mm512_mul_ps(x, vs), vz);
#endif
            if (out_bf16) _mm256_storeu_si256((__m256i *)(ob + i), bf16x16(w));
            else _mm512_storeu_ps(of + i, w);
        }
        for (; i < stop; i++) {
            const float w = combine1((float)(code_at(units, first + i, bits) + qmin), s, zero_point, z);
            if (out_bf16) ob[i] = to_bf16(w); else of[i] = w;
        }
        j = stop;
        g++;
        boundary += group;
    }
}
#endif

/* Whether this build splits work between OpenMP threads (those of torch's runtime, already loaded). */
int sdnq_threaded(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Decode values [first, first + count) (first and count multiples of the chunk size) into out (float32, or
 * bfloat16 bits when out_bf16), on up to `threads` threads. scale/zero_point are indexed by value / group.
 * bits: a packed width, 8 for unsigned bytes, -8 for two's-complement bytes. lut: NULL for integer codes
 * (value = code + qmin), else the 2**bits float values of the codes (mini-floats, float8). */
int sdnq_decode(const uint8_t *units, int64_t first, int64_t count, int bits, int vpc, int32_t qmin,
                const float *lut, const float *scale, const float *zero_point, int64_t group, void *out,
                int out_bf16, int threads)
{
    if (first % vpc || count % vpc || group <= 0 || threads <= 0) return 1;
    if (bits != 4 && bits != 8 && bits != -8) {
        int known = 0;
#define KNOWN(B) known |= bits == B;
        SDNQ_WIDTHS(KNOWN)
#undef KNOWN
        if (!known) return 1;
    }
    const int64_t tiles = (count + TILE - 1) / TILE;
    if (tiles < 16) threads = 1; /* below ~64k values a thread costs more than it saves */
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t t0 = t * TILE, n = count - t0 < TILE ? count - t0 : TILE;
#if SDNQ_AVX512
        if (!lut && (bits == 4 || bits == 8 || bits == -8)) {
            decode_tile_simd(units, first + t0, n, bits, qmin, scale, zero_point, group,
                             out_bf16 ? (void *)((uint16_t *)out + t0) : (void *)((float *)out + t0), out_bf16);
            continue;
        }
#endif
        if (out_bf16) {
            float tmp[TILE];
            decode_tile(units, first + t0, n, bits, qmin, lut, scale, zero_point, group, tmp);
            uint16_t *o = (uint16_t *)out + t0;
            for (int64_t i = 0; i < n; i++) o[i] = to_bf16(tmp[i]);
        } else {
            decode_tile(units, first + t0, n, bits, qmin, lut, scale, zero_point, group, (float *)out + t0);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Quantized matmul helpers (layers/qmatmul.py). Each repeats, per element and in the same order, the torch
 * operations the reference's forward uses, so the results are the same bits (checked before first use).
 */

static inline float bf16_to_f32(uint16_t h)
{
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

#ifdef __FLT16_MAX__ /* float16 in and out where the compiler has _Float16 (IEEE conversions, rounding to even) */
#define SDNQ_F16 1
#else
#define SDNQ_F16 0
#endif

static inline float load_as_f32(const void *p, int64_t i, int dtype) /* 0 float32, 1 bfloat16, 2 float16 */
{
    if (dtype == 1) return bf16_to_f32(((const uint16_t *)p)[i]);
#if SDNQ_F16
    if (dtype == 2) return (float)((const _Float16 *)p)[i];
#endif
    return ((const float *)p)[i];
}

static inline int8_t quantize_one(float x, float s)
{
    const float t = x / s; /* then round half to even, clamp, convert: NaN (0/0, inf/inf) becomes 0 as in torch */
    if (t != t) return 0;
    float r = __builtin_rintf(t);
    r = r < -128.0f ? -128.0f : (r > 127.0f ? 127.0f : r);
    return (int8_t)r;
}

#if SDNQ_AVX512
static inline __m512 load16_f32(const void *p, int64_t i, int dtype) /* 16 values from i, widened exactly */
{
    if (dtype == 1)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    if (dtype == 2) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    return _mm512_loadu_ps((const float *)p + i);
}

static inline __m128i quantize16(__m512 x, __m512 s)
{
    const __m512 t = _mm512_div_ps(x, s);
    const __mmask16 ordered = _mm512_cmp_ps_mask(t, t, _CMP_ORD_Q); /* NaN -> 0 */
    __m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-128.0f)), _mm512_set1_ps(127.0f));
    return _mm512_cvtepi32_epi8(_mm512_maskz_cvtps_epi32(ordered, r));
}

static int quantize_row_simd(const void *x, int64_t r, int64_t cols, int dtype, int8_t *q, float *scale)
{
    const int64_t base = r * cols, full = cols / 16 * 16;
    __m512 top = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t c = 0; c < full; c += 16) {
        const __m512 a = _mm512_abs_ps(load16_f32(x, base + c, dtype));
        nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        top = _mm512_max_ps(top, a);
    }
    float t = _mm512_reduce_max_ps(top);
    int any_nan = nan != 0;
    for (int64_t c = full; c < cols; c++) {
        const float a = __builtin_fabsf(load_as_f32(x, base + c, dtype));
        any_nan |= a != a;
        t = a > t ? a : t;
    }
    const float s = any_nan ? __builtin_nanf("") : t / 127.0f;
    scale[r] = s;
    const __m512 vs = _mm512_set1_ps(s);
    for (int64_t c = 0; c < full; c += 16)
        _mm_storeu_si128((__m128i *)(q + base + c), quantize16(load16_f32(x, base + c, dtype), vs));
    for (int64_t c = full; c < cols; c++) q[base + c] = quantize_one(load_as_f32(x, base + c, dtype), s);
    return 0;
}

static void scale_row_simd(const float *acc, int64_t r, int64_t cols, float a_scale, const float *sw, int sw_one,
                           const void *base, int base_kind, int base_dtype, void *out, int out_dtype)
{
    const int64_t row = r * cols, full = cols / 16 * 16;
    const __m512 vx = _mm512_set1_ps(a_scale);
    for (int64_t c = 0; c < full; c += 16) {
        const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(acc + row + c), vx);
        const __m512 w = sw_one ? _mm512_set1_ps(sw[0]) : _mm512_loadu_ps(sw + c);
        __m512 y;
        if (base_kind == 0) {
            y = _mm512_mul_ps(a, w);
        } else {
            const __m512 b = load16_f32(base, base_kind == 1 ? c : row + c, base_dtype);
#if FUSED
            y = _mm512_fmadd_ps(a, w, b);
#else
            y = _mm512_add_ps(b, _mm512_mul_ps(a, w));
#endif
        }
        if (out_dtype == 1) _mm256_storeu_si256((__m256i *)((uint16_t *)out + row + c), bf16x16(y));
        else if (out_dtype == 2)
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + row + c),
                                _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        else _mm512_storeu_ps((float *)out + row + c, y);
    }
}
#endif

/* Symmetric int8 codes of each row of x (rows x cols, float32 / bfloat16 / float16, contiguous):
 * scale[r] = max|x[r,:]| / 127, q[r,c] = clamp(round(x[r,c] / scale[r]), -128, 127). */
int sdnq_quantize_rows(const void *x, int64_t rows, int64_t cols, int in_dtype, int8_t *q, float *scale, int threads)
{
    if (rows <= 0 || cols <= 0 || threads <= 0 || (in_dtype == 2 && !SDNQ_F16)) return 1;
    if (rows * cols < 65536) threads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t r = 0; r < rows; r++) {
#if SDNQ_AVX512
        if (quantize_row_simd(x, r, cols, in_dtype, q, scale) == 0) continue;
#endif
        float top = 0.0f;
        int nan = 0;
        if (in_dtype == 0) {
            const float *row = (const float *)x + r * cols;
            for (int64_t c = 0; c < cols; c++) {
                const float a = __builtin_fabsf(row[c]);
                nan |= a != a;
                top = a > top ? a : top;
            }
        } else {
            for (int64_t c = 0; c < cols; c++) {
                const float a = __builtin_fabsf(load_as_f32(x, r * cols + c, in_dtype));
                nan |= a != a;
                top = a > top ? a : top;
            }
        }
        const float s = nan ? __builtin_nanf("") : top / 127.0f; /* amax propagates NaN */
        scale[r] = s;
        int8_t *out = q + r * cols;
        if (in_dtype == 0) {
            const float *row = (const float *)x + r * cols;
            for (int64_t c = 0; c < cols; c++) out[c] = quantize_one(row[c], s);
        } else {
            for (int64_t c = 0; c < cols; c++) out[c] = quantize_one(load_as_f32(x, r * cols + c, in_dtype), s);
        }
    }
    return 0;
}

/* y[r,c] = base + (acc[r,c] * sx[r]) * sw[c] with one rounding for the last multiply-add when FUSED (torch.addcmul
 * on this CPU), else y = (acc * sx) * sw without a base. base_kind: 0 none, 1 a vector over columns, 2 a rows x
 * cols matrix; base / out dtypes: 0 float32, 1 bfloat16, 2 float16 (computed in float32, rounded once). sw has
 * one entry (sw_one) or one per column. */
int sdnq_scale_rows(const float *acc, int64_t rows, int64_t cols, const float *sx, const float *sw, int sw_one,
                    const void *base, int base_kind, int base_dtype, void *out, int out_dtype, int threads)
{
    if (rows <= 0 || cols <= 0 || threads <= 0 || (!SDNQ_F16 && (out_dtype == 2 || (base_kind && base_dtype == 2))))
        return 1;
    if (rows * cols < 65536) threads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const float a_scale = sx[r];
        int64_t c0 = 0;
#if SDNQ_AVX512
        scale_row_simd(acc, r, cols, a_scale, sw, sw_one, base, base_kind, base_dtype, out, out_dtype);
        c0 = cols / 16 * 16;
#endif
        for (int64_t c = c0; c < cols; c++) {
            const int64_t i = r * cols + c;
            const float a = acc[i] * a_scale, w = sw[sw_one ? 0 : c];
            float y;
            if (base_kind == 0) {
                y = a * w;
            } else {
                const float b = load_as_f32(base, base_kind == 1 ? c : i, base_dtype);
#if FUSED
                y = __builtin_fmaf(a, w, b);
#else
                const float p = a * w;
                y = b + p;
#endif
            }
            if (out_dtype == 1) ((uint16_t *)out)[i] = to_bf16(y);
#if SDNQ_F16
            else if (out_dtype == 2) ((_Float16 *)out)[i] = (_Float16)y;
#endif
            else ((float *)out)[i] = y;
        }
    }
    return 0;
}

/* Rows [0, rows) of a layer's codes (per_row values each, decoded as sdnq_decode does into float32) re-quantized
 * per row to int8: scale[r] = max|w[r,:]| / 127, q = clamp(round(w / scale[r])). per_row must be a multiple of the
 * width's chunk size. */
int sdnq_requantize_rows(const uint8_t *units, int64_t rows, int64_t per_row, int bits, int vpc, int32_t qmin,
                         const float *lut, const float *scale, const float *zero_point, int64_t group, int8_t *q,
                         float *qscale, float *work, int threads)
{
    if (rows <= 0 || per_row <= 0 || per_row % vpc || group <= 0 || threads <= 0) return 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t r = 0; r < rows; r++) {
#ifdef _OPENMP
        float *row = work + (int64_t)omp_get_thread_num() * per_row;
#else
        float *row = work;
#endif
        for (int64_t t0 = 0; t0 < per_row; t0 += TILE) {
            const int64_t n = per_row - t0 < TILE ? per_row - t0 : TILE;
#if SDNQ_AVX512
            if (!lut && (bits == 4 || bits == 8 || bits == -8)) {
                decode_tile_simd(units, r * per_row + t0, n, bits, qmin, scale, zero_point, group, row + t0, 0);
                continue;
            }
#endif
            decode_tile(units, r * per_row + t0, n, bits, qmin, lut, scale, zero_point, group, row + t0);
        }
#if SDNQ_AVX512
        quantize_row_simd(row, 0, per_row, 0, q + r * per_row, qscale + r);
#else
        float top = 0.0f;
        int nan = 0;
        for (int64_t c = 0; c < per_row; c++) {
            const float a = __builtin_fabsf(row[c]);
            nan |= a != a;
            top = a > top ? a : top;
        }
        const float s = nan ? __builtin_nanf("") : top / 127.0f;
        qscale[r] = s;
        for (int64_t c = 0; c < per_row; c++) q[r * per_row + c] = quantize_one(row[c], s);
#endif
    }
    return 0;
}
