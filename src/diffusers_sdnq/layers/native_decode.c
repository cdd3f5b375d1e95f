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
 * loops because they are most of the Hub's checkpoints. The caller checks every size; this file trusts them.
 */
#include <stddef.h>
#include <stdint.h>

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
