// llama.cpp's block formats as gLLM reads them, and the shapes shared by every quantized-product source.
//
// A weight row of k values is k / 32 blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or k / 256 super-blocks
// (Q4_K, Q5_K, Q6_K), stored one after another exactly as in the GGUF file. Every value is
//     w = D * s * q - M * m
// with q a small unsigned integer (signed for Q8_0), s / m small integer scales of a 16- or 32-value group
// (1 for the 32-value types), and D / M float16 factors of the block. Products multiply q with
// activations quantized to int8 with one scale per 16 values (QuantActs), and apply the factors in
// float32 per 32 values: the integer sums are exact, so every instruction path computes the same numbers
// up to the order of float32 sums. (A scale per 16 values, not llama.cpp's 32 or 256: activations have
// outliers, and on the default model a scale per 32 costs five times the perplexity of one per 16.)
//
// Everything here has internal linkage: each source that includes it is compiled with its own target
// flags, and no function compiled for one instruction set may stand in for another's.

#pragma once

#include <cstdint>
#include <cstring>

// GGML type ids (gguf.GGMLQuantizationType), the ids the Python side passes.
enum QuantType : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

// Activations of one product, rows of k values: q [rows][k] int8 in -127..127, x ~ step * q with one step per
// 16 values (max |x| / 127); d [rows][k / 32][8], the steps of each 32 values' two halves, each written
// four times (the lanes of int32 sums of four products); s16 [rows][k / 16] = step * (sum of q) over 16
// values, and s32 [rows][k / 32] over 32: the activation sums that offsets and minimums multiply.
struct QuantActs {
    const int8_t* q;
    const float* d;
    const float* s16;
    const float* s32;
    int64_t k;
};

// One weight (n rows of row_bytes each) times m activation rows: y [m][ldy] float32, columns 0..n-1.
struct QuantGemm {
    int type;
    const uint8_t* w;
    int64_t row_bytes;
    int64_t n;
    QuantActs a;
    int64_t m;
    float* y;
    int64_t ldy;
};

namespace {

constexpr int64_t QK = 256;  // values in a K super-block

constexpr int block_values(int type) { return type == Q4_K || type == Q5_K || type == Q6_K ? 256 : 32; }

constexpr int block_bytes(int type) {
    switch (type) {
        case Q4_0: return 18;   // d, 16 bytes of nibbles
        case Q4_1: return 20;   // d, m, 16 bytes of nibbles
        case Q5_0: return 22;   // d, 32 high bits, 16 bytes of nibbles
        case Q5_1: return 24;   // d, m, 32 high bits, 16 bytes of nibbles
        case Q8_0: return 34;   // d, 32 int8
        case Q4_K: return 144;  // d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        case Q5_K: return 176;  // d, dmin, scales, 32 bytes of high bits, 128 bytes of nibbles
        case Q6_K: return 210;  // 128 bytes of low nibbles, 64 of high pairs, 16 int8 scales, d
        default: return 0;
    }
}

inline float fp16_to_float(const uint8_t* p) {  // IEEE half, exactly (every half is a float)
    uint16_t h;
    std::memcpy(&h, p, 2);
    const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return __builtin_bit_cast(float, sign | 0x7f800000u | (man << 13));
    if (exp != 0) return __builtin_bit_cast(float, sign | ((exp + 112) << 23) | (man << 13));
    const float tiny = float(man) * (1.0f / 16777216.0f);  // subnormal: man * 2^-24
    return sign ? -tiny : tiny;
}

// Q4_K / Q5_K: eight 6-bit scales and eight 6-bit minimums packed in 12 bytes.
inline void k_scales(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xf) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

// The unsigned quants of a block (32 or 256 of them, 0..63), or Q8_0's signed ones.
inline void unpack_quants(int type, const uint8_t* b, int8_t* q) {
    switch (type) {
        case Q4_0:
        case Q4_1:
        case Q5_0:
        case Q5_1: {
            const int nib = type == Q4_0 ? 2 : type == Q4_1 ? 4 : type == Q5_0 ? 6 : 8;
            uint32_t high = 0;
            if (type == Q5_0 || type == Q5_1) std::memcpy(&high, b + nib - 4, 4);
            for (int i = 0; i < 16; ++i) {
                q[i] = int8_t((b[nib + i] & 0xf) | (((high >> i) & 1) << 4));
                q[i + 16] = int8_t((b[nib + i] >> 4) | (((high >> (i + 16)) & 1) << 4));
            }
            break;
        }
        case Q8_0: std::memcpy(q, b + 2, 32); break;
        case Q4_K:
        case Q5_K: {
            const uint8_t* qs = b + (type == Q4_K ? 16 : 48);
            for (int c = 0; c < 4; ++c)
                for (int l = 0; l < 32; ++l) {
                    int lo = qs[32 * c + l] & 0xf, hi = qs[32 * c + l] >> 4;
                    if (type == Q5_K) {
                        lo |= ((b[16 + l] >> (2 * c)) & 1) << 4;
                        hi |= ((b[16 + l] >> (2 * c + 1)) & 1) << 4;
                    }
                    q[64 * c + l] = int8_t(lo);
                    q[64 * c + 32 + l] = int8_t(hi);
                }
            break;
        }
        case Q6_K:
            for (int v = 0; v < 256; ++v) {
                const int h = v / 128, s = (v % 128) / 32, l = v % 32;
                const int low = (b[64 * h + (s & 1) * 32 + l] >> (s < 2 ? 0 : 4)) & 0xf;
                const int high = (b[128 + 32 * h + l] >> (2 * s)) & 3;
                q[v] = int8_t(low | (high << 4));
            }
            break;
    }
}

// One block as floats, computed the way gguf.quants.dequantize computes it (float32, same order).
inline void dequantize_block(int type, const uint8_t* b, float* out) {
    int8_t q[256];
    unpack_quants(type, b, q);
    if (type == Q4_K || type == Q5_K) {
        const float d = fp16_to_float(b), dmin = fp16_to_float(b + 2);
        uint8_t sc[8], mn[8];
        k_scales(b + 4, sc, mn);
        for (int v = 0; v < 256; ++v) {
            const float scale = d * float(sc[v / 32]), low = dmin * float(mn[v / 32]);
            out[v] = scale * float(q[v]) - low;
        }
    } else if (type == Q6_K) {
        const float d = fp16_to_float(b + 208);
        for (int v = 0; v < 256; ++v) out[v] = (d * float(int8_t(b[192 + v / 16]))) * float(q[v] - 32);
    } else {
        const float d = fp16_to_float(b);
        const float m = type == Q4_1 || type == Q5_1 ? fp16_to_float(b + 2) : 0.0f;
        const int offset = type == Q4_0 ? 8 : type == Q5_0 ? 16 : 0;
        for (int i = 0; i < 32; ++i) {
            if (type == Q4_1 || type == Q5_1) out[i] = d * float(q[i]) + m;
            else out[i] = d * float(q[i] - offset);
        }
    }
}

}  // namespace
