// Quantized products with 256-bit x86 vectors, written once over a dot-product policy ``D``:
//     D::dot(w, a)  8 x int32: the sums of four adjacent u8 w x s8 a products
// AVX2 spells it maddubs + madd, the VNNI sets dpbusd (quant_avx2.cpp, quant_avxvnni.cpp,
// quant_avx512vnni.cpp include this file with their own target flags). Where a group's integer scale
// applies (K types), maddubs' pair sums go through madd with the scales instead, on every set.
//
// The kernel takes one weight row at a time against up to four activation rows: the row's blocks are
// unpacked into registers once and multiplied with each activation row, so a decode step of many
// streams reads and unpacks every weight once, and a prompt's rows go four at a time. Activation rows
// are taken in chunks that stay in the core's cache while a thread walks its weight rows.
//
// No saturation: maddubs adds two u8 x s8 products in int16, and every u8 here is at most 63 (Q6_K)
// or a Q8_0 magnitude up to 128, against |a| <= 127: at most 2 * 128 * 127 = 32512.

#pragma once

#include <immintrin.h>

#include <type_traits>

#include "quant_formats.h"

namespace {

inline float half(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

inline __m256i load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

inline __m256i nibbles(const uint8_t* p) {  // 16 bytes -> 32 values: the low nibbles, then the high ones
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), _mm256_set1_epi8(0x0f));
}

inline __m256i high_bits(const uint8_t* p) {  // 32 bits -> 0x10 in each byte whose bit is set
    uint32_t bits;
    std::memcpy(&bits, p, 4);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), spread);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), _mm256_set1_epi8(0x10));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Every row's sums run in two chains of multiply-adds (even and odd parts), added at the end: with one
// chain each multiply-add waits for the last (four cycles apiece) while the CPU could start two a cycle.
// Every row count takes the same chains, so a row's result does not depend on the rows beside it
// (batch invariance, gllm/ops/invariant.py).

// Activation rows m, m + 1, ...: row r's values at q + r * k, its steps at d + r * k / 4, and so on.
struct Rows : QuantActs {
    Rows(const QuantActs& a, int64_t m)
        : QuantActs{a.q + m * a.k, a.d + m * (a.k / 4), a.s16 + m * (a.k / 16), a.s32 + m * (a.k / 32), a.k} {}
    const int8_t* values(int r, int64_t at) const { return q + r * k + at; }
    __m256 steps(int r, int64_t at) const { return _mm256_loadu_ps(d + r * (k / 4) + at / 4); }  // 32 values at ``at``
};

// An int16 lane of each 128-bit half of v, copied to every lane of that half: lane ``lo`` in the low half,
// ``hi`` in the high half (vpshufb picks bytes 2 lane, 2 lane + 1 within each half).
template <int LO, int HI>
inline __m256i spread16(__m256i v) {
    return _mm256_shuffle_epi8(v, _mm256_set_m128i(_mm_set1_epi16(short(0x0100 + 0x0202 * HI)),
                                                   _mm_set1_epi16(short(0x0100 + 0x0202 * LO))));
}

// w x a for 32 values, group scales applied (int16 lanes 0-7 for the first 16 values, 8-15 for the
// next), as float32 lanes: lanes 0-3 hold the first 16 values' sums, 4-7 the next 16's.
inline __m256 scaled_dot(__m256i w, __m256i a, __m256i scales) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, a), scales));
}

// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: blocks of 32 values, one float16 scale each (and a minimum for Q4_1 / Q5_1).
template <class D, int T, int R>
inline void rows_32(const QuantGemm& g, const uint8_t* w, int64_t m, float* out) {
    constexpr int bytes = block_bytes(T);
    const Rows a(g.a, m);
    __m256 acc[R], odd[R];  // odd: the odd blocks' sums, a second chain
    float offsets[R];
    for (int r = 0; r < R; ++r) acc[r] = odd[r] = _mm256_setzero_ps(), offsets[r] = 0.0f;
    for (int64_t b = 0; b < g.a.k / 32; ++b) {
        const uint8_t* blk = w + b * bytes;
        const __m256 d = _mm256_set1_ps(half(blk));
        __m256i q, raw = _mm256_setzero_si256();
        float offset = 0.0f;  // w = d * q - offset
        if (T == Q4_0) q = nibbles(blk + 2), offset = 8.0f * half(blk);
        if (T == Q4_1) q = nibbles(blk + 4), offset = -half(blk + 2);
        if (T == Q5_0) q = _mm256_or_si256(nibbles(blk + 6), high_bits(blk + 2)), offset = 16.0f * half(blk);
        if (T == Q5_1) q = _mm256_or_si256(nibbles(blk + 8), high_bits(blk + 4)), offset = -half(blk + 2);
        if (T == Q8_0) raw = load(blk + 2), q = _mm256_sign_epi8(raw, raw);  // |w|; a takes w's sign
        for (int r = 0; r < R; ++r) {
            __m256i x = load(a.values(r, b * 32));
            if (T == Q8_0) x = _mm256_sign_epi8(x, raw);
            const __m256 sum = _mm256_mul_ps(_mm256_cvtepi32_ps(D::dot(q, x)), a.steps(r, b * 32));
            __m256& chain = (b & 1) ? odd[r] : acc[r];
            chain = _mm256_fmadd_ps(sum, d, chain);
            if (T != Q8_0) offsets[r] += offset * a.s32[r * (a.k / 32) + b];
        }
    }
    for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc[r], odd[r])) - offsets[r];
}

// Q4_K / Q5_K scales and minimums (eight 6-bit each, in 12 bytes): scales as int16 in lanes 0-7 of both
// halves, and the minimums as float32.
inline void k_scale_vectors(const uint8_t* p, __m256i& scales, __m256& mins) {
    uint32_t u[3];
    std::memcpy(u, p, 12);
    const uint32_t sc_lo = u[0] & 0x3f3f3f3f, sc_hi = (u[2] & 0x0f0f0f0f) | ((u[0] >> 2) & 0x30303030);
    const uint32_t mn_lo = u[1] & 0x3f3f3f3f, mn_hi = ((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 2) & 0x30303030);
    scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_set_epi32(0, 0, int(sc_hi), int(sc_lo))));
    mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, int(mn_hi), int(mn_lo))));
}

// Q4_K and Q5_K: super-blocks of 256 values, eight groups of 32 with 6-bit scales and minimums.
template <class D, int T, int R>
inline void rows_q45k(const QuantGemm& g, const uint8_t* w, int64_t m, float* out) {
    constexpr int bytes = block_bytes(T), quants = T == Q4_K ? 16 : 48;
    const Rows a(g.a, m);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f), top = _mm256_set1_epi8(0x10);
    for (int64_t b = 0; b < g.a.k / QK; ++b) {
        const uint8_t* blk = w + b * bytes;
        __m256i scales;
        __m256 mins;
        k_scale_vectors(blk + 4, scales, mins);
        const __m256i high = T == Q5_K ? load(blk + 16) : _mm256_setzero_si256();
        __m256 part[R], high_part[R];  // high_part: the odd groups' sums, a second chain
        for (int r = 0; r < R; ++r) part[r] = high_part[r] = _mm256_setzero_ps();
        auto chunk = [&](auto c_) {  // values 64c..64c+63: groups 2c (low nibbles) and 2c + 1 (high)
            constexpr int c = decltype(c_)::value;
            const __m256i raw = load(blk + quants + 32 * c);
            __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
            if (T == Q5_K) {  // bit 2c of each high byte tops group 2c, bit 2c + 1 group 2c + 1
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(high, 2 * c), 4), top));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(high, 2 * c + 1), 4), top));
            }
            const __m256i s_lo = spread16<2 * c, 2 * c>(scales), s_hi = spread16<2 * c + 1, 2 * c + 1>(scales);
            for (int r = 0; r < R; ++r) {
                const int64_t at = b * QK + 64 * c;
                part[r] = _mm256_fmadd_ps(scaled_dot(lo, load(a.values(r, at)), s_lo), a.steps(r, at), part[r]);
                high_part[r] =
                    _mm256_fmadd_ps(scaled_dot(hi, load(a.values(r, at + 32)), s_hi), a.steps(r, at + 32), high_part[r]);
            }
        };
        chunk(std::integral_constant<int, 0>());
        chunk(std::integral_constant<int, 1>());
        chunk(std::integral_constant<int, 2>());
        chunk(std::integral_constant<int, 3>());
        const __m256 d = _mm256_set1_ps(half(blk)), low = _mm256_mul_ps(mins, _mm256_set1_ps(-half(blk + 2)));
        for (int r = 0; r < R; ++r) {  // d x the scaled sums, less dmin x each group's minimum x its sum
            acc[r] = _mm256_fmadd_ps(_mm256_add_ps(part[r], high_part[r]), d, acc[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(a.s32 + r * (a.k / 32) + b * 8), low, acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// Q6_K: super-blocks of 256 values, sixteen groups of 16 with int8 scales, quants 0..63 less 32.
template <class D, int R>
inline void rows_q6k(const QuantGemm& g, const uint8_t* w, int64_t m, float* out) {
    const Rows a(g.a, m);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0f), top2 = _mm256_set1_epi8(0x30);
    for (int64_t b = 0; b < g.a.k / QK; ++b) {
        const uint8_t* blk = w + b * block_bytes(Q6_K);
        const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192));
        const __m256i scales = _mm256_cvtepi8_epi16(sc8);
        const __m256i first = _mm256_permute2x128_si256(scales, scales, 0x00);  // scales 0-7 in both halves
        const __m256i second = _mm256_permute2x128_si256(scales, scales, 0x11);  // scales 8-15
        __m256 part[R], odd[R];  // odd: the odd 32-value runs' sums, a second chain
        for (int r = 0; r < R; ++r) part[r] = odd[r] = _mm256_setzero_ps();
        auto half_block = [&](auto h_) {  // 64 bytes of nibbles and 32 of 2-bit pairs: values 128h..128h+127
            constexpr int h = decltype(h_)::value;
            const __m256i ql0 = load(blk + 64 * h), ql1 = load(blk + 64 * h + 32), qh = load(blk + 128 + 32 * h);
            const __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(ql0, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), top2)),
                _mm256_or_si256(_mm256_and_si256(ql1, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), top2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4), _mm256_and_si256(qh, top2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                                _mm256_and_si256(_mm256_srli_epi16(qh, 2), top2)),
            };
            const __m256i group = h == 0 ? first : second;  // values 32c..32c+31 take scales 2c and 2c + 1
            const __m256i sc[4] = {spread16<0, 1>(group), spread16<2, 3>(group), spread16<4, 5>(group),
                                   spread16<6, 7>(group)};
            for (int s = 0; s < 4; ++s)
                for (int r = 0; r < R; ++r) {
                    const int64_t at = b * QK + 128 * h + 32 * s;
                    __m256& chain = (s & 1) ? odd[r] : part[r];
                    chain = _mm256_fmadd_ps(scaled_dot(q[s], load(a.values(r, at)), sc[s]), a.steps(r, at), chain);
                }
        };
        half_block(std::integral_constant<int, 0>());
        half_block(std::integral_constant<int, 1>());
        // less 32 x each group's activation sum, times its scale
        const __m256 minus32 = _mm256_set1_ps(-32.0f);
        const __m256 off_lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8)), minus32);
        const __m256 off_hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8))), minus32);
        const __m256 d = _mm256_set1_ps(half(blk + 208));
        for (int r = 0; r < R; ++r) {
            const float* sums = a.s16 + r * (a.k / 16) + b * 16;
            part[r] = _mm256_fmadd_ps(_mm256_loadu_ps(sums), off_lo, _mm256_add_ps(part[r], odd[r]));
            part[r] = _mm256_fmadd_ps(_mm256_loadu_ps(sums + 8), off_hi, part[r]);
            acc[r] = _mm256_fmadd_ps(part[r], d, acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

template <class D, int T, int R>
inline void rows(const QuantGemm& g, const uint8_t* w, int64_t m, float* out) {
    if (T == Q4_K || T == Q5_K) rows_q45k<D, T, R>(g, w, m, out);
    else if (T == Q6_K) rows_q6k<D, R>(g, w, m, out);
    else rows_32<D, T, R>(g, w, m, out);
}

template <class D, int T>
void gemm(const QuantGemm& g, int64_t n0, int64_t n1) {
    // activation rows per pass over the weight rows: about 256 KB of them
    const int64_t chunk = g.m <= 4 ? 4 : (((256 << 10) / g.a.k) / 4 > 0 ? ((256 << 10) / g.a.k) / 4 * 4 : 4);
    for (int64_t m0 = 0; m0 < g.m; m0 += chunk) {
        const int64_t m1 = m0 + chunk < g.m ? m0 + chunk : g.m;
        for (int64_t n = n0; n < n1; ++n) {
            const uint8_t* w = g.w + n * g.row_bytes;
            float out[4];
            for (int64_t m = m0; m < m1; m += 4) {
                const int64_t left = m1 - m;
                if (left >= 4) rows<D, T, 4>(g, w, m, out);
                else if (left == 3) rows<D, T, 3>(g, w, m, out);
                else if (left == 2) rows<D, T, 2>(g, w, m, out);
                else rows<D, T, 1>(g, w, m, out);
                for (int64_t r = 0; r < (left < 4 ? left : 4); ++r) g.y[(m + r) * g.ldy + n] = out[r];
            }
        }
    }
}

template <class D>
void gemm_any(const QuantGemm& g, int64_t n0, int64_t n1) {
    switch (g.type) {
        case Q4_0: gemm<D, Q4_0>(g, n0, n1); break;
        case Q4_1: gemm<D, Q4_1>(g, n0, n1); break;
        case Q5_0: gemm<D, Q5_0>(g, n0, n1); break;
        case Q5_1: gemm<D, Q5_1>(g, n0, n1); break;
        case Q8_0: gemm<D, Q8_0>(g, n0, n1); break;
        case Q4_K: gemm<D, Q4_K>(g, n0, n1); break;
        case Q5_K: gemm<D, Q5_K>(g, n0, n1); break;
        case Q6_K: gemm<D, Q6_K>(g, n0, n1); break;
    }
}

}  // namespace
