/* CPU kernels of kvcomp's plugins, each the twin of a torch reference and one call per layer:
 *   kvc_attend            decode attention over packed 2/4/8-bit tiers and a dense part (attend.py)
 *   kvc_quantize_many     quantise+pack, reading token rows directly or through indices (packing.py)
 *   kvc_split             a prefill layer's token split into residual, tiers and dropped (tiers.py)
 *   kvc_window_attention  the scorers' mean attention from the window queries (scorers/_common.py)
 * Built on first use by kvcomp_plugins/native/__init__.py; no torch headers, called through ctypes.
 *
 * Decode attention is the C twin of attend.py's torch reference (same layouts, same maths, float32
 * throughout): one call attends every query row of every (batch row, KV head) over all tiers of a
 * layer and its full-precision tokens. Codes are unpacked and dequantised in vector registers
 * (KVC_LANES channels at a time); a row's logits against KVC_LANES keys are summed lane-wise and
 * then across lanes in one shuffle tree; a block of values is dequantised once and added to
 * every row. Each (batch row, KV head)'s keys are cut into `spans` that threads take as work
 * items (3 KV heads on 2 cores would otherwise leave a core idle for a third of the call); each
 * span keeps its own softmax maximum and sum, merged by log-sum-exp at the end. Nothing the size
 * of the layer is written but the logits, and a decode step of one layer is one call instead of
 * dozens of small torch ops (what a CPU decode step pays for).
 *
 * Layouts (all contiguous, row-major; BH = batch * KV heads):
 *   rows    float32 [BH, R, D]       queries, already multiplied by the softmax scale
 *   tier i  packed  uint8  [BH, n_i, D * bits_i / 8]   lowest channel in the lowest bits
 *           keys per channel ("channel"): scale/zero fp16 [BH, ceil(n_i / G), D]
 *           keys per token ("token") and values: scale/zero fp16 [BH, n_i, D / G]
 *           pad     uint8 [BH, n_i] (1 = padding slot, never attended) or NULL
 *   dense   keys/values of dense_dtype (0 float32, 1 float16, 2 bfloat16), token rows of D
 *           elements; row t of (batch-head) bh starts at element bh * dense_bh_stride + t * D;
 *           dmask uint8 [BH, R, n_dense] (1 = may attend) or NULL
 *   logits  float32 scratch [BH, R, total], total = sum n_i + n_dense
 *   partial float32 scratch [BH, spans, R, D + 2]
 *   out     float32 [BH, R, D]
 * Every row must see at least one key (in a decode step: its own token in the dense part).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define KVC_MAX_D 512

#if defined(__F16C__)
#include <immintrin.h>
static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0) {
        float f = (float)mantissa * 5.9604644775390625e-08f; /* subnormal (or zero): m * 2^-24 */
        return sign ? -f : f;
    }
    if (exponent == 31)
        bits = sign | 0x7f800000u | (mantissa << 13);
    else
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

/* One dense token row as float32 (x is written only where a conversion is needed). */
static inline const float *dense_row(const void *base, int dtype, int64_t offset, int64_t d, float *restrict x) {
    if (dtype == 0) return (const float *)base + offset;
    if (dtype == 1) {
#if defined(__FLT16_MAX__)
        const _Float16 *h = (const _Float16 *)base + offset;
        for (int64_t c = 0; c < d; c++) x[c] = (float)h[c];
#else
        const uint16_t *h = (const uint16_t *)base + offset;
        for (int64_t c = 0; c < d; c++) x[c] = half_to_float(h[c]);
#endif
    } else {
        const uint16_t *h = (const uint16_t *)base + offset;
        for (int64_t c = 0; c < d; c++) {
            uint32_t bits = (uint32_t)h[c] << 16;
            memcpy(&x[c], &bits, sizeof bits);
        }
    }
    return x;
}

/* exp(x) for x <= 0 (softmax arguments), branch-free so a loop of it vectorises: x = k ln2 + r
 * with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error below 3e-7 there),
 * times 2^k built in the exponent bits. x below -87 gives e^-87 (~1.6e-38, negligible next to the
 * row's maximum term of 1); masked logits (-inf) are mapped to exactly 0 by the caller. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float k = floorf(x * 1.44269504f + 0.5f);
    float r = x - k * 0.693145752f - k * 1.42860677e-06f; /* ln2 in two parts: r stays exact */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666667e-1f + r * (4.16666667e-2f + r * (8.33333333e-3f + r * 1.38888889e-3f)))));
    union { int32_t i; float f; } scale; /* a union, not memcpy: the loop calling this vectorises */
    scale.i = ((int32_t)k + 127) << 23;
    return p * scale.f;
}

/* exp(l[t] - top) in place over a row of logits whose maximum is top, a masked logit (-inf) giving
 * exactly 0; returns the row's sum (the softmax's denominator). A row with every logit masked
 * (top = -inf) becomes all 0 with sum 0. */
static inline float exp_row(float *restrict l, int64_t n, float top) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; t++) {
        float p = l[t] == -INFINITY ? 0.0f : exp_nonpositive(l[t] - top);
        l[t] = p;
        sum += p;
    }
    return sum;
}

/* KVC_LANES floats as one vector (GCC/clang vector extension): 16 with AVX-512, else 8 (one AVX
 * register; the compiler splits it where the CPU's vectors are narrower). Head dims the kernel
 * serves are multiples of 16. KVC_PORTABLE builds the unpacking of other CPUs here,
 * KVC_NO_SHUFFLE the lane-by-lane sums of compilers without __builtin_shufflevector (tests). */
#if defined(__AVX512F__) && !defined(KVC_PORTABLE)
#define KVC_LANES 16
#define KVC_AVX512 1
#elif defined(__AVX2__) && !defined(KVC_PORTABLE)
#define KVC_LANES 8
#define KVC_AVX2 1
#else
#define KVC_LANES 8
#endif
#if defined(KVC_AVX512) || defined(KVC_AVX2)
#include <immintrin.h>
/* The 4-bit codes of the low bytes of p, one per byte, in channel order (low nibble first). */
static inline __attribute__((always_inline)) __m128i kvc_nibbles(__m128i p) {
    __m128i low4 = _mm_set1_epi8(15);
    return _mm_unpacklo_epi8(_mm_and_si128(p, low4), _mm_and_si128(_mm_srli_epi16(p, 4), low4));
}
#endif
typedef float kvc_vec __attribute__((vector_size(KVC_LANES * sizeof(float))));
#define KVC_MAX_CHUNKS (KVC_MAX_D / KVC_LANES)

static inline kvc_vec vec_load(const float *p) {
    kvc_vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vec_store(float *p, kvc_vec v) { memcpy(p, &v, sizeof v); }

static inline kvc_vec vec_splat(float a) { return (kvc_vec){0} + a; }

/* Codes of channels [c0, c0 + KVC_LANES) of a packed token row (lowest channel in the lowest
 * bits) as floats, built in registers (c0 % KVC_LANES == 0): one load, a nibble interleave or a
 * shift per lane, a widening and a conversion. (GCC's generic vector code for the same byte
 * shuffles goes through memory, several times slower.) vec_fma: a * b + c in one rounding (the
 * build keeps C's rule of no implicit contraction, which the packing's bit-exact recipe needs). */
#if defined(KVC_AVX512)
static inline __attribute__((always_inline)) kvc_vec codes_vec(const uint8_t *row, int bits, int64_t c0) {
    __m128i b;
    if (bits == 8) {
        b = _mm_loadu_si128((const __m128i *)(row + c0));
    } else if (bits == 4) {
        b = kvc_nibbles(_mm_loadl_epi64((const __m128i *)(row + c0 / 2)));
    } else {
        int32_t w;
        memcpy(&w, row + c0 / 4, sizeof w);
        __m512i u = _mm512_srlv_epi32(_mm512_set1_epi32(w), _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
        return (kvc_vec)_mm512_cvtepi32_ps(_mm512_and_si512(u, _mm512_set1_epi32(3)));
    }
    return (kvc_vec)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}

static inline kvc_vec vec_fma(kvc_vec a, kvc_vec b, kvc_vec c) { return (kvc_vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#elif defined(KVC_AVX2)
static inline __attribute__((always_inline)) kvc_vec codes_vec(const uint8_t *row, int bits, int64_t c0) {
    __m128i b;
    if (bits == 8) {
        b = _mm_loadl_epi64((const __m128i *)(row + c0));
    } else if (bits == 4) {
        int32_t w;
        memcpy(&w, row + c0 / 2, sizeof w);
        b = kvc_nibbles(_mm_cvtsi32_si128(w));
    } else {
        uint16_t w;
        memcpy(&w, row + c0 / 4, sizeof w);
        __m256i u = _mm256_srlv_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
        return (kvc_vec)_mm256_cvtepi32_ps(_mm256_and_si256(u, _mm256_set1_epi32(3)));
    }
    return (kvc_vec)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}

#if defined(__FMA__)
static inline kvc_vec vec_fma(kvc_vec a, kvc_vec b, kvc_vec c) { return (kvc_vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
static inline kvc_vec vec_fma(kvc_vec a, kvc_vec b, kvc_vec c) { return a * b + c; }
#endif
#else
typedef uint32_t kvc_uvec __attribute__((vector_size(KVC_LANES * sizeof(uint32_t))));
static inline __attribute__((always_inline)) kvc_vec codes_vec(const uint8_t *row, int bits, int64_t c0) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && \
    !((defined(__x86_64__) || defined(__i386__)) && !defined(__AVX2__))
    /* 8 lanes: the codes' bytes read as little-endian words, each lane shifting its own code
     * down by its own amount (NEON has such shifts; x86 before AVX2 has not, and there the plain
     * loop below is faster). */
    uint32_t w0, w1;
    if (bits == 8) {
        memcpy(&w0, row + c0, 4);
        memcpy(&w1, row + c0 + 4, 4);
        const kvc_uvec shift = {0, 8, 16, 24, 0, 8, 16, 24}, mask = {255, 255, 255, 255, 255, 255, 255, 255};
        return __builtin_convertvector(((kvc_uvec){w0, w0, w0, w0, w1, w1, w1, w1} >> shift) & mask, kvc_vec);
    }
    if (bits == 4) {
        memcpy(&w0, row + c0 / 2, 4);
        const kvc_uvec shift = {0, 4, 8, 12, 16, 20, 24, 28}, mask = {15, 15, 15, 15, 15, 15, 15, 15};
        return __builtin_convertvector((((kvc_uvec){0} + w0) >> shift) & mask, kvc_vec);
    }
    uint16_t h;
    memcpy(&h, row + c0 / 4, 2);
    const kvc_uvec shift = {0, 2, 4, 6, 8, 10, 12, 14}, mask = {3, 3, 3, 3, 3, 3, 3, 3};
    return __builtin_convertvector((((kvc_uvec){0} + (uint32_t)h) >> shift) & mask, kvc_vec);
#else
    float x[KVC_LANES];
    int per_byte = 8 / bits, mask = (1 << bits) - 1;
    for (int i = 0; i < KVC_LANES; i++)
        x[i] = (float)((row[(c0 + i) / per_byte] >> (bits * ((c0 + i) % per_byte))) & mask);
    return vec_load(x);
#endif
}

static inline kvc_vec vec_fma(kvc_vec a, kvc_vec b, kvc_vec c) { return a * b + c; }
#endif

/* Lane i of the result: the sum of the lanes of v[i]. A tree of pair sums (KVC_LANES - 1
 * shuffled additions for KVC_LANES sums) instead of sums each added lane by lane, in order. */
#if !defined(KVC_NO_SHUFFLE) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) /* __builtin_shufflevector */
#if KVC_LANES == 16
#define KVC_EVEN 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define KVC_ODD 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#else
#define KVC_EVEN 0, 2, 4, 6, 8, 10, 12, 14
#define KVC_ODD 1, 3, 5, 7, 9, 11, 13, 15
#endif
static inline kvc_vec sum_lanes(const kvc_vec *v) {
    kvc_vec w[KVC_LANES];
    for (int i = 0; i < KVC_LANES; i++) w[i] = v[i];
    for (int n = KVC_LANES / 2; n >= 1; n /= 2)
        for (int i = 0; i < n; i++)
            w[i] = __builtin_shufflevector(w[2 * i], w[2 * i + 1], KVC_EVEN) + __builtin_shufflevector(w[2 * i], w[2 * i + 1], KVC_ODD);
    return w[0];
}
#else
static inline kvc_vec sum_lanes(const kvc_vec *v) {
    kvc_vec out = {0};
    for (int i = 0; i < KVC_LANES; i++)
        for (int j = 0; j < KVC_LANES; j++) out[i] += v[i][j];
    return out;
}
#endif

typedef struct {
    const uint8_t *kp, *vp, *pad;
    const uint16_t *ks, *kz, *vs, *vz;
    int64_t n;
    int32_t bits, key_token_axis;
} kvc_tier;

/* One (batch row, KV head)'s view of a tier: its rows and statistics. */
typedef struct {
    const uint8_t *kp, *vp, *pad;
    const uint16_t *ks, *kz, *vs, *vz;
    int64_t packed_d;
} kvc_tier_bh;

static inline kvc_tier_bh tier_bh(const kvc_tier *t, int64_t bh, int64_t d, int64_t g) {
    int64_t packed_d = d * t->bits / 8, key_stats = t->key_token_axis ? t->n * (d / g) : ((t->n + g - 1) / g) * d;
    kvc_tier_bh v = {t->kp + bh * t->n * packed_d, t->vp + bh * t->n * packed_d, t->pad ? t->pad + bh * t->n : NULL,
                     t->ks + bh * key_stats, t->kz + bh * key_stats, t->vs + bh * t->n * (d / g),
                     t->vz + bh * t->n * (d / g), packed_d};
    return v;
}

/* Dequantised codes of channels [c0, c0 + KVC_LANES) of a token quantised per token in groups of
 * g channels: codes * scale + zero, with scale and zero read per lane (groups that are not a
 * multiple of KVC_LANES channels: small groups in tests; models use 32-128). */
static inline __attribute__((always_inline)) kvc_vec token_dequant(const uint8_t *row, int bits, int64_t c0, int64_t g,
                                                                     const uint16_t *s, const uint16_t *z) {
    kvc_vec sv, zv;
    for (int i = 0; i < KVC_LANES; i++) {
        sv[i] = half_to_float(s[(c0 + i) / g]);
        zv[i] = half_to_float(z[(c0 + i) / g]);
    }
    return vec_fma(codes_vec(row, bits, c0), sv, zv);
}

/* All d channels of one token quantised per token into k[d / KVC_LANES]. Groups of a multiple of KVC_LANES
 * channels take one (scale, zero) per group, read once. */
static inline __attribute__((always_inline)) void token_row(const uint8_t *row, int bits, int64_t d, int64_t g,
                                                            const uint16_t *s, const uint16_t *z, kvc_vec *k) {
    if (g % KVC_LANES) {
        for (int64_t ci = 0; ci < d / KVC_LANES; ci++) k[ci] = token_dequant(row, bits, ci * KVC_LANES, g, s, z);
        return;
    }
    for (int64_t grp = 0, ci = 0; grp < d / g; grp++) {
        kvc_vec sv = vec_splat(half_to_float(s[grp])), zv = vec_splat(half_to_float(z[grp]));
        for (int64_t end = ci + g / KVC_LANES; ci < end; ci++) k[ci] = vec_fma(codes_vec(row, bits, ci * KVC_LANES), sv, zv);
    }
}

#define KVC_ROWS 16 /* query rows whose dot products with a block of KVC_LANES keys are kept together */

/* part[r][j] = the lane-wise products of query row r (of q [nr][d]) with key k [d / KVC_LANES]. */
static inline __attribute__((always_inline)) void rows_times_key(const float *q, int64_t nr, int64_t d, const kvc_vec *k,
                                                                 kvc_vec part[KVC_ROWS][KVC_LANES], int64_t j) {
    for (int64_t r = 0; r < nr; r++) {
        const float *qr = q + r * d;
        kvc_vec a = vec_load(qr) * k[0];
        for (int64_t ci = 1; ci < d / KVC_LANES; ci++) a = vec_fma(vec_load(qr + ci * KVC_LANES), k[ci], a);
        part[r][j] = a;
    }
}

/* The logits of a block of nb keys for nr rows: out[r * total + j] = the sum of part[r][j]'s lanes,
 * or -inf where key j is a padding slot (pad[j] = 1, a tier's) or row r may not see it
 * (visible[r * stride + j] = 0, the dense part's mask); either may be NULL. */
static inline __attribute__((always_inline)) void store_logits(kvc_vec part[KVC_ROWS][KVC_LANES], int64_t nr, int64_t nb,
                                                               float *out, int64_t total, const uint8_t *pad,
                                                               const uint8_t *visible, int64_t stride) {
    for (int64_t r = 0; r < nr; r++) {
        kvc_vec sums = sum_lanes(part[r]);
        float *o = out + r * total;
        const uint8_t *v = visible ? visible + r * stride : NULL;
        for (int64_t j = 0; j < nb; j++) o[j] = ((pad && pad[j]) || (v && !v[j])) ? -INFINITY : sums[j];
    }
}

/* Logits of rows q [r_count][d] against tokens [t0, t1) of a tier, into l[r * total + tok - t0]
 * (-inf for padding slots). Keys are dequantised in registers, KVC_LANES channels at a time; each
 * row's products with KVC_LANES keys are summed lane-wise, then across lanes in one tree. */
static inline __attribute__((always_inline)) void tier_logits(const kvc_tier_bh *t, int bits, int key_token_axis, int64_t t0,
                                                              int64_t t1, const float *q, int64_t r_count, int64_t d,
                                                              int64_t g, float *l, int64_t total) {
    int64_t chunks = d / KVC_LANES, stats_d = key_token_axis ? d / g : d;
    kvc_vec kscale[KVC_MAX_CHUNKS], kzero[KVC_MAX_CHUNKS], k[KVC_MAX_CHUNKS];
    kvc_vec part[KVC_ROWS][KVC_LANES];
    int64_t group_end = -1; /* first token past the group whose per-channel statistics are loaded */
    for (int64_t b0 = t0; b0 < t1; b0 += KVC_LANES) {
        int64_t nb = t1 - b0 < KVC_LANES ? t1 - b0 : KVC_LANES;
        for (int64_t r0 = 0; r0 < r_count; r0 += KVC_ROWS) {
            int64_t nr = r_count - r0 < KVC_ROWS ? r_count - r0 : KVC_ROWS;
            for (int64_t j = 0; j < KVC_LANES; j++) {
                if (j >= nb) { /* lanes past the end of the span */
                    for (int64_t r = 0; r < nr; r++) part[r][j] = (kvc_vec){0};
                    continue;
                }
                int64_t tok = b0 + j;
                const uint8_t *row = t->kp + tok * t->packed_d;
                if (key_token_axis) {
                    token_row(row, bits, d, g, t->ks + tok * stats_d, t->kz + tok * stats_d, k);
                } else {
                    if (tok >= group_end || tok < group_end - g) { /* per-channel statistics of a new token group */
                        int64_t grp = tok / g;
                        group_end = (grp + 1) * g;
                        for (int64_t c = 0; c < d; c++) {
                            kscale[c / KVC_LANES][c % KVC_LANES] = half_to_float(t->ks[grp * d + c]);
                            kzero[c / KVC_LANES][c % KVC_LANES] = half_to_float(t->kz[grp * d + c]);
                        }
                    }
                    for (int64_t ci = 0; ci < chunks; ci++) k[ci] = vec_fma(codes_vec(row, bits, ci * KVC_LANES), kscale[ci], kzero[ci]);
                }
                rows_times_key(q + r0 * d, nr, d, k, part, j);
            }
            store_logits(part, nr, nb, l + r0 * total + (b0 - t0), total, t->pad ? t->pad + b0 : NULL, NULL, 0);
        }
    }
}

#define KVC_VBLOCK 8 /* value tokens dequantised together, then added to every row */

/* acc[r][:] += sum over tokens [t0, t1) of a tier of p[r][tok] * value[tok] (p = l, already
 * exponentiated): a block of tokens is dequantised once, then added to every row. */
static inline __attribute__((always_inline)) void tier_values(const kvc_tier_bh *t, int bits, int64_t t0, int64_t t1,
                                                              const float *l, int64_t total, int64_t r_count, int64_t d,
                                                              int64_t g, float *acc) {
    int64_t chunks = d / KVC_LANES, stats_d = d / g;
    kvc_vec v[KVC_VBLOCK][KVC_MAX_CHUNKS];
    float pb[r_count * KVC_VBLOCK];
    for (int64_t b0 = t0; b0 < t1; b0 += KVC_VBLOCK) {
        int64_t nb = t1 - b0 < KVC_VBLOCK ? t1 - b0 : KVC_VBLOCK;
        int seen = 0;
        for (int64_t r = 0; r < r_count; r++)
            for (int64_t j = 0; j < KVC_VBLOCK; j++) {
                float p = j < nb ? l[r * total + (b0 - t0) + j] : 0.0f;
                pb[r * KVC_VBLOCK + j] = p;
                seen |= p != 0.0f;
            }
        if (!seen) continue; /* e.g. a block of padding slots */
        for (int64_t j = 0; j < KVC_VBLOCK; j++) {
            if (j < nb) {
                int64_t tok = b0 + j;
                token_row(t->vp + tok * t->packed_d, bits, d, g, t->vs + tok * stats_d, t->vz + tok * stats_d, v[j]);
            } else {
                for (int64_t ci = 0; ci < chunks; ci++) v[j][ci] = (kvc_vec){0};
            }
        }
        for (int64_t r = 0; r < r_count; r++) {
            const float *p = pb + r * KVC_VBLOCK;
            for (int64_t ci = 0; ci < chunks; ci++) {
                float *o = acc + r * d + ci * KVC_LANES;
                kvc_vec a = vec_load(o);
                for (int64_t j = 0; j < KVC_VBLOCK; j++) a = vec_fma(vec_splat(p[j]), v[j][ci], a);
                vec_store(o, a);
            }
        }
    }
}

/* The dense part's twins of tier_logits and tier_values, over tokens [t0, t1) of its rows. */
static inline __attribute__((always_inline)) void dense_logits(const void *dk, int dtype, int64_t base, int64_t t0, int64_t t1,
                                                               const uint8_t *mask, int64_t n_dense, const float *q,
                                                               int64_t r_count, int64_t d, float *l, int64_t total) {
    int64_t chunks = d / KVC_LANES;
    float x[KVC_MAX_D] __attribute__((aligned(64)));
    kvc_vec part[KVC_ROWS][KVC_LANES], k[KVC_MAX_CHUNKS];
    for (int64_t b0 = t0; b0 < t1; b0 += KVC_LANES) {
        int64_t nb = t1 - b0 < KVC_LANES ? t1 - b0 : KVC_LANES;
        for (int64_t r0 = 0; r0 < r_count; r0 += KVC_ROWS) {
            int64_t nr = r_count - r0 < KVC_ROWS ? r_count - r0 : KVC_ROWS;
            for (int64_t j = 0; j < KVC_LANES; j++) {
                const float *key = dense_row(dk, dtype, base + (b0 + (j < nb ? j : 0)) * d, d, x);
                for (int64_t ci = 0; ci < chunks; ci++) k[ci] = vec_load(key + ci * KVC_LANES);
                rows_times_key(q + r0 * d, nr, d, k, part, j);
            }
            store_logits(part, nr, nb, l + r0 * total + (b0 - t0), total, NULL, mask ? mask + r0 * n_dense + b0 : NULL, n_dense);
        }
    }
}

static inline __attribute__((always_inline)) void dense_values(const void *dv, int dtype, int64_t base, int64_t t0, int64_t t1,
                                                               const float *l, int64_t total, int64_t r_count, int64_t d,
                                                               float *acc) {
    int64_t chunks = d / KVC_LANES;
    float x[KVC_MAX_D] __attribute__((aligned(64)));
    for (int64_t tok = t0; tok < t1; tok++) {
        const float *value = dense_row(dv, dtype, base + tok * d, d, x);
        for (int64_t r = 0; r < r_count; r++) {
            float p = l[r * total + (tok - t0)];
            if (p == 0.0f) continue;
            for (int64_t ci = 0; ci < chunks; ci++) {
                float *o = acc + r * d + ci * KVC_LANES;
                vec_store(o, vec_fma(vec_splat(p), vec_load(value + ci * KVC_LANES), vec_load(o)));
            }
        }
    }
}

/* A tier's bit width as a constant, so that codes_vec and the loops around it are specialised. */
#define KVC_BY_BITS(bits, call) \
    do {                        \
        if ((bits) == 8) {      \
            const int b_ = 8;   \
            call;               \
        } else if ((bits) == 4) { \
            const int b_ = 4;   \
            call;               \
        } else {                \
            const int b_ = 2;   \
            call;               \
        }                       \
    } while (0)

typedef struct {
    const float *rows;
    const kvc_tier *tiers;
    int64_t n_tiers, r_count, d, g, total, n_dense, dense_bh_stride, span, spans;
    const void *dk, *dv;
    int dense_dtype;
    const uint8_t *dmask;
    float *logits, *partial, *out;
} kvc_attend_args;

/* Work item (bh, span): the softmax statistics and unnormalised output of the keys in columns
 * [span * a->span, ...) of the layer (tiers in order, then the dense part), written to
 * partial[(bh * spans + span) * r_count * (d + 2)]: r_count rows of d outputs, then each row's
 * maximum logit and its sum of exp(logit - maximum). */
static inline __attribute__((always_inline)) void attend_span(const kvc_attend_args *a, int64_t bh, int64_t span, int64_t d) {
    int64_t r_count = a->r_count, total = a->total, g = a->g;
    /* Empty when the spans were rounded up past the end: all stats then say "nothing visible". */
    int64_t c0 = span * a->span < total ? span * a->span : total, c1 = c0 + a->span < total ? c0 + a->span : total;
    const float *q = a->rows + bh * r_count * d;
    float *l = a->logits + bh * r_count * total;
    float *acc = a->partial + (bh * a->spans + span) * r_count * (d + 2);
    float *stats = acc + r_count * d;
    const uint8_t *dmask = a->dmask ? a->dmask + bh * r_count * a->n_dense : NULL;
    int64_t dense_base = bh * a->dense_bh_stride;

    /* The span's share [s0[i], s1[i]) of each part i (the tiers, then the dense part at n_tiers),
     * whose first column is first[i]. */
    int64_t parts = a->n_tiers + 1, first[parts], s0[parts], s1[parts];
    for (int64_t i = 0, col = 0; i < parts; i++) {
        int64_t n = i < a->n_tiers ? a->tiers[i].n : a->n_dense;
        first[i] = col;
        s0[i] = c0 > col ? c0 - col : 0;
        s1[i] = c1 - col < n ? c1 - col : n;
        col += n;
    }

    /* Logits of the span, part by part. */
    for (int64_t i = 0; i < parts; i++) {
        if (s0[i] >= s1[i]) continue;
        float *lp = l + first[i] + s0[i];
        if (i == a->n_tiers) {
            dense_logits(a->dk, a->dense_dtype, dense_base, s0[i], s1[i], dmask, a->n_dense, q, r_count, d, lp, total);
            continue;
        }
        kvc_tier_bh t = tier_bh(&a->tiers[i], bh, d, g);
        if (a->tiers[i].key_token_axis)
            KVC_BY_BITS(a->tiers[i].bits, tier_logits(&t, b_, 1, s0[i], s1[i], q, r_count, d, g, lp, total));
        else
            KVC_BY_BITS(a->tiers[i].bits, tier_logits(&t, b_, 0, s0[i], s1[i], q, r_count, d, g, lp, total));
    }

    /* Softmax statistics of the span (unnormalised: the merge divides). */
    for (int64_t r = 0; r < r_count; r++) {
        float *row = l + r * total + c0, top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (int64_t c = 0; c < c1 - c0; c++) top = row[c] > top ? row[c] : top;
        stats[2 * r] = top;
        stats[2 * r + 1] = exp_row(row, c1 - c0, top);
    }

    /* Values, weighted. */
    memset(acc, 0, (size_t)(r_count * d) * sizeof(float));
    for (int64_t i = 0; i < parts; i++) {
        if (s0[i] >= s1[i]) continue;
        const float *lp = l + first[i] + s0[i];
        if (i == a->n_tiers) {
            dense_values(a->dv, a->dense_dtype, dense_base, s0[i], s1[i], lp, total, r_count, d, acc);
            continue;
        }
        kvc_tier_bh t = tier_bh(&a->tiers[i], bh, d, g);
        KVC_BY_BITS(a->tiers[i].bits, tier_values(&t, b_, s0[i], s1[i], lp, total, r_count, d, g, acc));
    }
}

/* out[bh] from its spans: each span's output and sum rescaled to the largest maximum. */
static void merge_spans(const kvc_attend_args *a, int64_t bh) {
    int64_t r_count = a->r_count, d = a->d;
    for (int64_t r = 0; r < r_count; r++) {
        float top = -INFINITY, sum = 0.0f;
        for (int64_t s = 0; s < a->spans; s++) {
            const float *stats = a->partial + (bh * a->spans + s) * r_count * (d + 2) + r_count * d;
            top = stats[2 * r] > top ? stats[2 * r] : top;
        }
        float *o = a->out + (bh * r_count + r) * d;
        memset(o, 0, (size_t)d * sizeof(float));
        for (int64_t s = 0; s < a->spans; s++) {
            const float *acc = a->partial + (bh * a->spans + s) * r_count * (d + 2);
            const float *stats = acc + r_count * d;
            if (stats[2 * r + 1] == 0.0f) continue; /* nothing visible in this span */
            float w = expf(stats[2 * r] - top);
            sum += w * stats[2 * r + 1];
            for (int64_t c = 0; c < d; c++) o[c] += w * acc[r * d + c];
        }
        float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (int64_t c = 0; c < d; c++) o[c] *= inv;
    }
}

/* Returns 0, or -1 for arguments out of range (the caller checks first; this is a last guard). */
int kvc_attend(const float *rows, int64_t bh_count, int64_t r_count, int64_t d, int64_t g,
               const kvc_tier *tiers, int64_t n_tiers, const void *dk, const void *dv, int32_t dense_dtype, int64_t dense_bh_stride,
               int64_t n_dense, const uint8_t *dmask, float *logits, int64_t total, int64_t spans, float *partial,
               float *out, int32_t threads) {
    if (d < KVC_LANES || d > KVC_MAX_D || d % KVC_LANES || g < 1 || spans < 1) return -1;
    for (int64_t i = 0; i < n_tiers; i++)
        if (tiers[i].bits != 2 && tiers[i].bits != 4 && tiers[i].bits != 8) return -1;
    if (d % g) return -1; /* values are quantised per token in groups of g channels */
    int64_t span = (total + spans - 1) / spans;
    span = (span + KVC_LANES - 1) / KVC_LANES * KVC_LANES;
    kvc_attend_args a = {rows, tiers, n_tiers, r_count, d, g, total, n_dense, dense_bh_stride, span, spans,
                         dk, dv, dense_dtype, dmask, logits, partial, out};
    int64_t items = bh_count * spans;
#pragma omp parallel num_threads(threads) if (threads > 1 && items > 1)
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            int64_t bh = item / spans, s = item % spans;
            /* d as a constant for the common head dims: the per-channel loops become whole vectors. */
            if (d == 64)
                attend_span(&a, bh, s, 64);
            else if (d == 128)
                attend_span(&a, bh, s, 128);
            else
                attend_span(&a, bh, s, d);
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < bh_count; bh++) merge_spans(&a, bh);
    }
    return 0;
}

/* ---- Quantise and pack (prefill and decode flushes) -----------------------------------------
 * The recipe of packing.py, step by step in the same fp32 operations, so the bytes are the torch
 * reference's bit for bit: group min/max; zero = min rounded down to fp16; scale = max(span / qmax,
 * smallest fp32) rounded up to fp16 (0 for a constant group); code = clamp(floor((x - zero) /
 * scale + 0.5), 0, qmax). Needs the compiler's _Float16 (round-to-nearest-even conversions);
 * kvc_quantize_available() says whether this build has it.
 *
 *   x      float32 [BH, n, D]
 *   packed uint8   [BH, n, D * bits / 8]
 *   scale/zero fp16 [BH, ceil(n / G), D] (axis "channel", token_axis = 0) or [BH, n, D / G] (1)
 */
#if defined(__FLT16_MAX__)
static inline uint16_t f16_bits(_Float16 h) {
    uint16_t u;
    memcpy(&u, &h, sizeof u);
    return u;
}

/* Largest fp16 <= v (fp16 range assumed), as bits. */
static inline uint16_t round_down_f16(float v) {
    _Float16 h = (_Float16)v;
    uint16_t u = f16_bits(h);
    if ((float)h <= v) return u;
    if ((float)h == 0.0f) return 0x8001u;
    return (float)h < 0.0f ? (uint16_t)(u + 1) : (uint16_t)(u - 1);
}

/* Smallest fp16 >= v (fp16 range assumed), as bits. */
static inline uint16_t round_up_f16(float v) {
    _Float16 h = (_Float16)v;
    uint16_t u = f16_bits(h);
    if ((float)h >= v) return u;
    if ((float)h == 0.0f) return 0x0001u;
    return (float)h > 0.0f ? (uint16_t)(u + 1) : (uint16_t)(u - 1);
}

/* (scale, zero) fp16 bits of a group with fp32 minimum mn and maximum mx. */
static inline void group_stats(float mn, float mx, float qmax, uint16_t *scale, uint16_t *zero) {
    *zero = round_down_f16(mn);
    float span = mx - half_to_float(*zero);
    float step = span > 0.0f ? span / qmax : 0.0f;
    if (span > 0.0f && step < 1.40129846e-45f) step = 1.40129846e-45f; /* smallest fp32 */
    *scale = round_up_f16(step);
}

/* Codes of one row into bytes; one loop per width, so that each has constant strides and vectorises. */
static void pack_row(const int32_t *restrict codes, int bits, int64_t d, uint8_t *restrict out) {
    if (bits == 8) {
        for (int64_t j = 0; j < d; j++) out[j] = (uint8_t)codes[j];
    } else if (bits == 4) {
        for (int64_t j = 0; j < d / 2; j++) out[j] = (uint8_t)(codes[2 * j] | codes[2 * j + 1] << 4);
    } else {
        for (int64_t j = 0; j < d / 4; j++)
            out[j] = (uint8_t)(codes[4 * j] | codes[4 * j + 1] << 2 | codes[4 * j + 2] << 4 | codes[4 * j + 3] << 6);
    }
}

/* Source rows of one quantisation request: row t of batch-head bh starts at
 * x + b * stride_b + h * stride_h + slot * stride_n (b = bh / heads, h = bh % heads), where slot is
 * idx[bh * n + t], or t when idx is NULL. Channels are contiguous. Reading through idx lets a
 * prefill layer's tiers be quantised straight from the attention's K/V (laid out [B, N, H, D]),
 * without a gathered float32 copy per tier. */
typedef struct {
    const float *x;
    const int64_t *idx;
    int64_t heads, stride_b, stride_h, stride_n;
    uint8_t *packed;
    uint16_t *scale, *zero;
    int64_t bh_count, n;
    int32_t bits, token_axis;
} kvc_quant_request;

static inline const float *source_row(const kvc_quant_request *r, int64_t bh, int64_t t) {
    int64_t slot = r->idx ? r->idx[bh * r->n + t] : t;
    return r->x + (bh / r->heads) * r->stride_b + (bh % r->heads) * r->stride_h + slot * r->stride_n;
}

/* Codes of one token row given per-channel fp32 zero and divisor (the scale, 1 where it is 0).
 * The clamped value is truncated instead of floored: x >= zero, so it is >= 0.5, where the two
 * agree, and the loop vectorises (floorf keeps it scalar under -std=c11). Codes are int32 so that
 * the vector width is set by the floats, not by a byte store. */
static inline void code_row(const float *restrict row, const float *restrict z, const float *restrict div, float qmax,
                            int64_t d, int32_t *restrict codes) {
    for (int64_t c = 0; c < d; c++) {
        float t = (row[c] - z[c]) / div[c] + 0.5f;
        t = t < 0.0f ? 0.0f : (t > qmax ? qmax : t);
        codes[c] = (int32_t)t;
    }
}

static void quantize_one(const kvc_quant_request *r, int64_t bh, int64_t d, int64_t g) {
    int bits = r->bits;
    int64_t n = r->n;
    float qmax = (float)((1 << bits) - 1);
    int64_t packed_d = d * bits / 8;
    uint8_t *packed = r->packed + bh * n * packed_d;
    int32_t codes[KVC_MAX_D];
    float z[KVC_MAX_D], div[KVC_MAX_D], mn[KVC_MAX_D], mx[KVC_MAX_D];
    if (r->token_axis) {
        int64_t groups = d / g;
        uint16_t *scale = r->scale + bh * n * groups, *zero = r->zero + bh * n * groups;
        for (int64_t t = 0; t < n; t++) {
            const float *row = source_row(r, bh, t);
            for (int64_t j = 0; j < groups; j++) {
                float lo = row[j * g], hi = row[j * g];
#pragma omp simd reduction(min : lo) reduction(max : hi)
                for (int64_t c = j * g; c < (j + 1) * g; c++) {
                    lo = row[c] < lo ? row[c] : lo;
                    hi = row[c] > hi ? row[c] : hi;
                }
                group_stats(lo, hi, qmax, &scale[t * groups + j], &zero[t * groups + j]);
                float s = half_to_float(scale[t * groups + j]), zj = half_to_float(zero[t * groups + j]);
                for (int64_t c = j * g; c < (j + 1) * g; c++) {
                    z[c] = zj;
                    div[c] = s > 0.0f ? s : 1.0f;
                }
            }
            code_row(row, z, div, qmax, d, codes);
            pack_row(codes, bits, d, packed + t * packed_d);
        }
        return;
    }
    int64_t token_groups = (n + g - 1) / g;
    uint16_t *scale = r->scale + bh * token_groups * d, *zero = r->zero + bh * token_groups * d;
    for (int64_t tg = 0; tg < token_groups; tg++) {
        int64_t first = tg * g, last = first + g < n ? first + g : n;
        const float *row = source_row(r, bh, first);
        for (int64_t c = 0; c < d; c++) mn[c] = mx[c] = row[c];
        for (int64_t t = first + 1; t < last; t++) {
            row = source_row(r, bh, t);
#pragma omp simd
            for (int64_t c = 0; c < d; c++) {
                mn[c] = row[c] < mn[c] ? row[c] : mn[c];
                mx[c] = row[c] > mx[c] ? row[c] : mx[c];
            }
        }
        for (int64_t c = 0; c < d; c++) {
            group_stats(mn[c], mx[c], qmax, &scale[tg * d + c], &zero[tg * d + c]);
            float s = half_to_float(scale[tg * d + c]);
            z[c] = half_to_float(zero[tg * d + c]);
            div[c] = s > 0.0f ? s : 1.0f;
        }
        for (int64_t t = first; t < last; t++) {
            code_row(source_row(r, bh, t), z, div, qmax, d, codes);
            pack_row(codes, bits, d, packed + t * packed_d);
        }
    }
}

static int quant_args_ok(int64_t d, int64_t g, int32_t bits, int32_t token_axis) {
    return d >= 1 && d <= KVC_MAX_D && g >= 1 && (bits == 2 || bits == 4 || bits == 8) && d % (8 / bits) == 0 &&
           !(token_axis && d % g);
}

/* All tensors of a layer (every tier's keys and values: same d and g) in one call; the (tensor,
 * batch-head) pairs are spread over the threads together. Returns 0, or -1 for bad arguments. */
int kvc_quantize_many(const kvc_quant_request *reqs, int64_t n_reqs, int64_t d, int64_t g, int32_t threads) {
    int64_t items = 0;
    for (int64_t i = 0; i < n_reqs; i++) {
        if (!quant_args_ok(d, g, reqs[i].bits, reqs[i].token_axis) || reqs[i].heads < 1) return -1;
        items += reqs[i].bh_count;
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic) if (threads > 1 && items > 1)
    for (int64_t item = 0; item < items; item++) {
        int64_t i = 0, bh = item;
        while (bh >= reqs[i].bh_count) bh -= reqs[i++].bh_count;
        quantize_one(&reqs[i], bh, d, g);
    }
    return 0;
}

int kvc_quantize_available(void) { return 1; }
#else
int kvc_quantize_many(const void *reqs, int64_t n_reqs, int64_t d, int64_t g, int32_t threads) { return -2; }

int kvc_quantize_available(void) { return 0; }
#endif

/* ---- Token split of a prefill layer (tiers.py's split_tokens, for rows that share positions) --
 * Candidates (slots not in the residual) are ranked per (batch row, KV head): real before
 * padding, then score descending (NaN as -inf), then the later slot first. That is a strict total
 * order, so any sort gives tiers.py's ranking. Consecutive runs of the ranking form the tiers
 * (counts[i] tokens each, highest precision first; the rest is dropped), and each tier is put in
 * position order, padding last in ranking order.
 *
 *   scores    float32 [BH, N] or NULL (all equal)      positions int64 [N] (-1 = padding)
 *   residual  uint8 [N] (1 = full-precision residual slot)
 *   tier_idx  int64 [BH, counts[i]] slot indices, tier_pos int32 [BH, counts[i]] their positions
 *   scratch   uint64 [BH, 2 * N]
 */
/* Sort m keys ascending: least-significant-digit radix sort, 8 bits a pass, passes whose digit
 * is the same for every key skipped (tmp holds m keys). A few passes over m keys instead of a
 * comparison sort's m log m calls through a function pointer. */
static void radix_sort_u64(uint64_t *restrict a, uint64_t *restrict tmp, int64_t m) {
    uint64_t *src = a, *dst = tmp;
    for (int shift = 0; shift < 64; shift += 8) {
        int64_t count[257] = {0};
        for (int64_t i = 0; i < m; i++) count[((src[i] >> shift) & 0xff) + 1]++;
        int constant = 0;
        for (int v = 1; v <= 256; v++) constant |= count[v] == m;
        if (constant) continue;
        for (int v = 0; v < 256; v++) count[v + 1] += count[v];
        for (int64_t i = 0; i < m; i++) dst[count[(src[i] >> shift) & 0xff]++] = src[i];
        uint64_t *swap = src;
        src = dst;
        dst = swap;
    }
    if (src != a) memcpy(a, src, (size_t)m * sizeof *a);
}

/* Order-preserving map of a float32 to uint32 (NaN read as -inf, -0 as +0). */
static inline uint32_t float_order(float v) {
    if (v != v) v = -INFINITY;
    if (v == 0.0f) v = 0.0f;
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

int kvc_split(const float *scores, const int64_t *positions, const uint8_t *residual, int64_t bh_count, int64_t n,
              int64_t n_tiers, const int64_t *counts, int64_t *const *tier_idx, int32_t *const *tier_pos,
              uint64_t *scratch, int32_t threads) {
    if (n >= (INT64_C(1) << 31)) return -1;
    int64_t n_c = 0, kept = 0;
    for (int64_t t = 0; t < n; t++) n_c += !residual[t];
    for (int64_t i = 0; i < n_tiers; i++) kept += counts[i];
    if (kept > n_c) return -1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && bh_count > 1)
    for (int64_t bh = 0; bh < bh_count; bh++) {
        uint64_t *keys = scratch + bh * 2 * n, *tmp = keys + n; /* ranking keys, then one tier's position keys */
        int64_t m = 0;
        for (int64_t t = 0; t < n; t++) {
            if (residual[t]) continue;
            uint64_t pad = positions[t] < 0;
            uint32_t s = scores ? ~float_order(scores[bh * n + t]) : 0u;
            keys[m++] = (pad << 63) | ((uint64_t)s << 31) | (uint64_t)(0x7fffffff - t);
        }
        radix_sort_u64(keys, tmp, m);
        int64_t start = 0;
        for (int64_t i = 0; i < n_tiers; i++) {
            int64_t k = counts[i];
            uint64_t *tier = keys + start; /* re-keyed in place: this run is not read again */
            for (int64_t j = 0; j < k; j++) {
                int64_t slot = 0x7fffffff - (int64_t)(tier[j] & 0x7fffffffu);
                int64_t pos = positions[slot];
                uint64_t order = pos < 0 ? ((UINT64_C(1) << 32) | (uint64_t)j) : (uint64_t)pos; /* < 2^33 */
                tier[j] = (order << 31) | (uint64_t)slot;
            }
            radix_sort_u64(tier, tmp, k);
            for (int64_t j = 0; j < k; j++) {
                int64_t slot = (int64_t)(tier[j] & 0x7fffffffu);
                tier_idx[i][bh * k + j] = slot;
                tier_pos[i][bh * k + j] = (int32_t)positions[slot];
            }
            start += k;
        }
    }
    return 0;
}


/* ---- Window attention of the prompt-guided scorers (scorers/_common.py) --------------------------
 * out[b, h, t] = sum_r weight[b, r % W] * softmax_r(q_r . k_t)[t]: the mean attention each key
 * receives from the window queries of its group. Row r = (query head of the group) * W + (window
 * query w); query w of batch row b sees key t iff 0 <= kpos[b, t] <= sees[b, w]. Every row must
 * see at least one key. Scaling as the torch reference: queries become q / s_q / s_k * inv_temp
 * (s_q, s_k the largest magnitudes of the group's queries and of the head's keys, floored at the
 * smallest normal float; inv_temp = min(s_q s_k / sqrt(D), 1e30) in double), so no product of
 * two finite inputs overflows.
 *
 *   queries float32 [B, H_kv * G, W, D] contiguous    keys float32, row t of (b, h) at
 *   keys + b * k_sb + h * k_sh + t * k_sn (channels contiguous)
 *   sees int64 [B, W]    kpos int64 [B, N]    weight float32 [B, W]    out float32 [B, H_kv, N]
 *   scratch float32 [G * W * (N + D) + ceil(N / KVC_KEY_BLOCK)]
 */
#define KVC_KEY_BLOCK 16
/* KVC_KEY_BLOCK floats as one vector (GCC/clang vector extension; split where the CPU's are narrower). */
typedef float kvc_keyvec __attribute__((vector_size(KVC_KEY_BLOCK * sizeof(float))));

static float abs_max_floored(float m) { return m > 1.17549435e-38f ? m : 1.17549435e-38f; }

/* One (batch row, KV head) of kvc_window_attention, called by every thread of the team: the
 * worksharing loops below bind to the caller's parallel region, so a layer costs one region and a
 * few barriers rather than a region per step (waking the threads each time). */
static void window_head(const float *q, const float *kb, int64_t k_sn, const int64_t *sees, const int64_t *pos,
                        const float *weight, int64_t r_count, int64_t w, int64_t n, int64_t d, float *o,
                        float *logits, float *q_unit, float *block_max) {
    int64_t blocks = (n + KVC_KEY_BLOCK - 1) / KVC_KEY_BLOCK;
    if (r_count == 0) {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n; t++) o[t] = 0.0f;
        return;
    }
    /* Largest key magnitude of each block of keys, then (one thread) of the head, and the
     * queries scaled by it. */
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t t1 = (blk + 1) * KVC_KEY_BLOCK < n ? (blk + 1) * KVC_KEY_BLOCK : n;
        float m = 0.0f;
        for (int64_t t = blk * KVC_KEY_BLOCK; t < t1; t++) {
            const float *k = kb + t * k_sn;
#pragma omp simd reduction(max : m)
            for (int64_t c = 0; c < d; c++) m = fabsf(k[c]) > m ? fabsf(k[c]) : m;
        }
        block_max[blk] = m;
    }
#pragma omp single
    {
        float s_q = 0.0f, s_k = 0.0f;
        for (int64_t i = 0; i < r_count * d; i++) s_q = fabsf(q[i]) > s_q ? fabsf(q[i]) : s_q;
        for (int64_t blk = 0; blk < blocks; blk++) s_k = block_max[blk] > s_k ? block_max[blk] : s_k;
        s_q = abs_max_floored(s_q);
        s_k = n ? abs_max_floored(s_k) : 1.0f;
        double temp = (double)s_q * (double)s_k / sqrt((double)d);
        float inv_temp = (float)(temp < 1e30 ? temp : 1e30);
        for (int64_t i = 0; i < r_count * d; i++) q_unit[i] = q[i] / s_q / s_k * inv_temp;
    }

    /* Logits, a block of keys at a time: the block is transposed so that each query row's
     * products run along the keys, one vector lane per key. */
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t t0 = blk * KVC_KEY_BLOCK, nb = n - t0 < KVC_KEY_BLOCK ? n - t0 : KVC_KEY_BLOCK;
        kvc_keyvec kt[KVC_MAX_D];
        for (int64_t j = 0; j < KVC_KEY_BLOCK; j++) {
            const float *k = kb + (t0 + (j < nb ? j : 0)) * k_sn;
            for (int64_t c = 0; c < d; c++) kt[c][j] = k[c];
        }
        /* Eight rows at a time, their sums in registers: each key vector is loaded once per
         * eight rows, and eight independent sums hide the latency of the additions. */
        int64_t r = 0;
        for (; r + 8 <= r_count; r += 8) {
            const float *qr = q_unit + r * d;
            kvc_keyvec a[8] = {{0}};
            for (int64_t c = 0; c < d; c++) {
                kvc_keyvec kc = kt[c];
                for (int i = 0; i < 8; i++) a[i] += qr[i * d + c] * kc;
            }
            for (int i = 0; i < 8; i++)
                for (int64_t j = 0; j < nb; j++) logits[(r + i) * n + t0 + j] = a[i][j];
        }
        for (; r < r_count; r++) {
            const float *q0 = q_unit + r * d;
            kvc_keyvec a0 = {0};
            for (int64_t c = 0; c < d; c++) a0 += q0[c] * kt[c];
            for (int64_t j = 0; j < nb; j++) logits[r * n + t0 + j] = a0[j];
        }
    }

    /* Masked softmax of every row, in place; the row's weight over its sum is kept in q_unit's
     * first r_count slots (q_unit is not read again). */
    float *coef = q_unit;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < r_count; r++) {
        float *l = logits + r * n, top = -INFINITY;
        int64_t upto = sees[r % w];
#pragma omp simd reduction(max : top)
        for (int64_t t = 0; t < n; t++) {
            float v = (pos[t] >= 0 && pos[t] <= upto) ? l[t] : -INFINITY;
            l[t] = v;
            top = v > top ? v : top;
        }
        float sum = exp_row(l, n, top);
        coef[r] = sum > 0.0f ? weight[r % w] / sum : 0.0f;
    }

    /* Weighted sum of the rows, in blocks of keys. */
#pragma omp for schedule(static)
    for (int64_t t0 = 0; t0 < n; t0 += 512) {
        int64_t t1 = t0 + 512 < n ? t0 + 512 : n;
        for (int64_t t = t0; t < t1; t++) o[t] = 0.0f;
        for (int64_t r = 0; r < r_count; r++) {
            float c = coef[r];
            const float *p = logits + r * n;
            if (c == 0.0f) continue;
#pragma omp simd
            for (int64_t t = t0; t < t1; t++) o[t] += c * p[t];
        }
    }
}

int kvc_window_attention(const float *queries, const float *keys, int64_t k_sb, int64_t k_sh, int64_t k_sn,
                         const int64_t *sees, const int64_t *kpos, const float *weight, int64_t b_count, int64_t heads,
                         int64_t g, int64_t w, int64_t n, int64_t d, float *out, float *scratch, int32_t threads) {
    if (d < 1 || d > KVC_MAX_D || g < 1 || w < 0 || n < 0) return -1;
    int64_t r_count = g * w;
    float *logits = scratch, *q_unit = scratch + r_count * n, *block_max = q_unit + r_count * d;
#pragma omp parallel num_threads(threads) if (threads > 1)
    for (int64_t bh = 0; bh < b_count * heads; bh++) {
        int64_t b = bh / heads, h = bh % heads;
        window_head(queries + bh * r_count * d, keys + b * k_sb + h * k_sh, k_sn, sees + b * w, kpos + b * n,
                    weight + b * w, r_count, w, n, d, out + bh * n, logits, q_unit, block_max);
    }
    return 0;
}

/* ---- Pooling and min-max normalisation of score terms (scorers/_common.py) ---------------------
 * Both read x float32 [B * H_kv, N] and a candidate mask uint8 [B, N] and write out [B * H_kv, N].
 *
 * kvc_pool: a 1-D pool of odd width `kernel` over the masked-in tokens (masked-out tokens count
 * as 0; scores are >= 0): the maximum, or (avg) the sum over the masked-in tokens in reach
 * divided by their number (0 where there is none). */
int kvc_pool(const float *x, const uint8_t *mask, int64_t b_count, int64_t heads, int64_t n, int64_t kernel,
             int32_t avg, float *out) {
    if (kernel < 1 || kernel % 2 == 0) return -1;
    int64_t half = kernel / 2;
    for (int64_t bh = 0; bh < b_count * heads; bh++) {
        const float *row = x + bh * n;
        const uint8_t *m = mask + (bh / heads) * n;
        float *o = out + bh * n;
        for (int64_t t = 0; t < n; t++) {
            int64_t lo = t - half < 0 ? 0 : t - half, hi = t + half + 1 < n ? t + half + 1 : n;
            if (!avg) {
                float top = -INFINITY;
                for (int64_t j = lo; j < hi; j++) {
                    float v = m[j] ? row[j] : 0.0f;
                    top = v > top ? v : top;
                }
                o[t] = top;
                continue;
            }
            float sum = 0.0f, count = 0.0f;
            for (int64_t j = lo; j < hi; j++) {
                sum += m[j] ? row[j] : 0.0f;
                count += m[j] ? 1.0f : 0.0f;
            }
            o[t] = count > 0.0f ? (sum / (float)kernel) / (count / (float)kernel) : 0.0f;
        }
    }
    return 0;
}

/* kvc_minmax: (x - lo) / (hi - lo) clamped to [0, 1], lo and hi the extremes over the masked-in
 * tokens of the (batch row, KV head); all zeros where that span is not finite and positive. */
int kvc_minmax(const float *x, const uint8_t *mask, int64_t b_count, int64_t heads, int64_t n, float *out) {
    for (int64_t bh = 0; bh < b_count * heads; bh++) {
        const float *row = x + bh * n;
        const uint8_t *m = mask + (bh / heads) * n;
        float *o = out + bh * n, lo = INFINITY, hi = -INFINITY;
        for (int64_t t = 0; t < n; t++) {
            float v = m[t] ? row[t] : INFINITY, u = m[t] ? row[t] : -INFINITY;
            lo = v < lo ? v : lo;
            hi = u > hi ? u : hi;
        }
        float span = hi - lo;
        if (!(isfinite(span) && span > 0.0f)) {
            for (int64_t t = 0; t < n; t++) o[t] = 0.0f;
            continue;
        }
        for (int64_t t = 0; t < n; t++) {
            float v = (row[t] - lo) / span;
            o[t] = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
        }
    }
    return 0;
}
