// Quantized products in plain C++: correct on every CPU, and the reference the vector paths are held to.
// The integer sums per block are those of the vector paths, term for term (see quant_formats.h).

#include "quant_formats.h"

namespace {

// The sum of four products per int32 lane, lane by lane as the vector paths form them: lane l of 32
// values takes values 4l..4l+3, so lanes 0-3 cover the first 16 values (one activation step) and 4-7 the next.
inline void lanes(const int8_t* w, const int8_t* a, const int32_t* scale, float* out, const float* d) {
    for (int l = 0; l < 8; ++l) {
        int32_t sum = 0;
        for (int i = 4 * l; i < 4 * l + 4; ++i) sum += int32_t(w[i]) * int32_t(a[i]);
        out[l] += float(sum * scale[l / 4]) * d[l];
    }
}

// One weight row against one activation row: the sum over its blocks.
float row_dot(int type, const uint8_t* w, const QuantActs& a, int64_t r) {
    const int64_t values = block_values(type), blocks = a.k / values, bytes = block_bytes(type);
    const int8_t* aq = a.q + r * a.k;
    const float* ad = a.d + r * (a.k / 4);
    const float* s16 = a.s16 + r * (a.k / 16);
    const float* s32 = a.s32 + r * (a.k / 32);
    float sum = 0.0f;
    int8_t q[256];
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* blk = w + b * bytes;
        unpack_quants(type, blk, q);
        float part[8] = {};
        if (type == Q4_K || type == Q5_K) {
            uint8_t sc[8], mn[8];
            k_scales(blk + 4, sc, mn);
            float mins = 0.0f;
            for (int j = 0; j < 8; ++j) {
                const int32_t scale[2] = {sc[j], sc[j]};
                lanes(q + 32 * j, aq + b * QK + 32 * j, scale, part, ad + (b * 8 + j) * 8);
                mins += float(mn[j]) * s32[b * 8 + j];
            }
            float scaled = 0.0f;
            for (float p : part) scaled += p;
            sum += fp16_to_float(blk) * scaled - fp16_to_float(blk + 2) * mins;
        } else if (type == Q6_K) {
            const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
            float offsets = 0.0f;
            for (int j = 0; j < 8; ++j) {
                const int32_t scale[2] = {sc[2 * j], sc[2 * j + 1]};
                lanes(q + 32 * j, aq + b * QK + 32 * j, scale, part, ad + (b * 8 + j) * 8);
            }
            for (int j = 0; j < 16; ++j) offsets += float(sc[j]) * s16[b * 16 + j];
            float scaled = 0.0f;
            for (float p : part) scaled += p;
            sum += fp16_to_float(blk + 208) * (scaled - 32.0f * offsets);
        } else {
            const float d = fp16_to_float(blk);
            float offset = 0.0f;  // the block's w = d * q - offset, times the sum of its activations
            if (type == Q4_0) offset = 8.0f * d;
            if (type == Q5_0) offset = 16.0f * d;
            if (type == Q4_1 || type == Q5_1) offset = -fp16_to_float(blk + 2);
            const int32_t one[2] = {1, 1};
            lanes(q, aq + b * 32, one, part, ad + b * 8);
            float scaled = 0.0f;
            for (float p : part) scaled += p;
            sum += d * scaled - offset * s32[b];
        }
    }
    return sum;
}

}  // namespace

extern "C" void gllm_quant_rows_portable(const QuantGemm* g, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t r = 0; r < g->m; ++r) g->y[r * g->ldy + n] = row_dot(g->type, g->w + n * g->row_bytes, g->a, r);
}
