// Entry points of the quantized products: which instruction set runs (the CPU's, checked at run time),
// the activations quantized once per product, threads split over weight rows, and rows of a quantized
// matrix dequantized (embedding lookups). Called through ctypes by gllm/ops/block_linear.py.
//
// Instruction sets, by id: 0 portable C++, 1 AVX2, 2 AVX-VNNI, 3 AVX512-VNNI, 4 AMX. Each set's kernels
// are built from their own source with their own target flags (quant_*.cpp), so one library serves
// every x86-64 CPU and the caller can pin any set the CPU has (tests run them all).

#include <cmath>
#include <cstdint>
#include <vector>

#include "quant_formats.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define GLLM_X86 1
#endif

extern "C" {
void gllm_quant_rows_portable(const QuantGemm*, int64_t, int64_t);
int gllm_quant_built_avx2();
void gllm_quant_rows_avx2(const QuantGemm*, int64_t, int64_t);
int gllm_quant_built_avxvnni();
void gllm_quant_rows_avxvnni(const QuantGemm*, int64_t, int64_t);
int gllm_quant_built_avx512vnni();
void gllm_quant_rows_avx512vnni(const QuantGemm*, int64_t, int64_t);
int gllm_quant_built_amx();
int gllm_quant_amx_permitted();
int gllm_quant_amx_bf16(int, const uint16_t*, int64_t, int64_t, int64_t, const uint8_t*, int64_t, uint16_t*, int64_t,
                        int);
}

namespace {

enum Isa { PORTABLE = 0, AVX2 = 1, AVXVNNI = 2, AVX512VNNI = 3, AMX = 4, ISAS = 5 };
using RowsFn = void (*)(const QuantGemm*, int64_t, int64_t);
const RowsFn ROWS[] = {gllm_quant_rows_portable, gllm_quant_rows_avx2, gllm_quant_rows_avxvnni,
                       gllm_quant_rows_avx512vnni};

#ifdef GLLM_X86
// What the CPU has and the operating system saves on a context switch (XCR0), per instruction set.
bool cpu_has(int isa) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(1, 0, &a, &b, &c, &d)) return false;
    const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
    if (!osxsave || !fma || !f16c) return false;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    const uint64_t xcr0 = (uint64_t(hi) << 32) | lo;
    const bool ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xe6) == 0xe6, tiles = (xcr0 & 0x60000) == 0x60000;
    unsigned b7 = 0, c7 = 0, d7 = 0, a71 = 0;
    if (!__get_cpuid_count(7, 0, &a, &b7, &c7, &d7)) return false;
    if (__get_cpuid_count(7, 1, &a71, &b, &c, &d) == 0) a71 = 0;
    const bool avx2 = ymm && (b7 & (1u << 5));
    const bool avx512 = zmm && (b7 & (1u << 16)) && (b7 & (1u << 30)) && (b7 & (1u << 31));  // F, BW, VL
    switch (isa) {
        case AVX2: return avx2;
        case AVXVNNI: return avx2 && (a71 & (1u << 4));
        case AVX512VNNI: return avx2 && avx512 && (c7 & (1u << 11));
        case AMX: return avx2 && avx512 && tiles && (d7 & (1u << 24)) && (d7 & (1u << 22)) && (a71 & (1u << 5));
        default: return false;
    }
}
#else
bool cpu_has(int) { return false; }
#endif

bool usable(int isa) {
    static const int flags = [] {
        int bits = 1 << PORTABLE;
        if (cpu_has(AVX2) && gllm_quant_built_avx2()) bits |= 1 << AVX2;
        if (cpu_has(AVXVNNI) && gllm_quant_built_avxvnni()) bits |= 1 << AVXVNNI;
        if (cpu_has(AVX512VNNI) && gllm_quant_built_avx512vnni()) bits |= 1 << AVX512VNNI;
        if (cpu_has(AMX) && gllm_quant_built_amx() && gllm_quant_amx_permitted()) bits |= 1 << AMX;
        return bits;
    }();
    return isa >= 0 && isa < ISAS && (flags >> isa) & 1;
}

inline float load(float x) { return x; }
inline float load(uint16_t x) { return __builtin_bit_cast(float, uint32_t(x) << 16); }

inline uint16_t to_bf16(float x) {  // round to nearest even, as torch does; NaN stays NaN
    const uint32_t u = __builtin_bit_cast(uint32_t, x);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

// One row (k a multiple of 32): per 16 values, step = max |x| / 127 and q = x * (1 / step) rounded to
// nearest even, in float32; the steps and sums as QuantActs lays them out.
template <typename T>
void quantize_row(const T* x, int64_t k, int8_t* q, float* d, float* s16, float* s32) {
    for (int64_t g = 0; g < k / 16; ++g) {
        const T* xs = x + g * 16;
        float amax = 0.0f;
        for (int i = 0; i < 16; ++i) amax = std::fmax(amax, std::fabs(load(xs[i])));
        const float step = amax / 127.0f, inverse = step > 0.0f ? 1.0f / step : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < 16; ++i) {
            q[g * 16 + i] = int8_t(std::fmin(127.0f, std::fmax(-127.0f, std::nearbyint(load(xs[i]) * inverse))));
            sum += q[g * 16 + i];
        }
        for (int l = 0; l < 4; ++l) d[g * 4 + l] = step;
        s16[g] = step * float(sum);
        if (g % 2) s32[g / 2] = s16[g - 1] + s16[g];
    }
}

void quantize_rows(const void* x, int x_bf16, int64_t m, int64_t k, int8_t* q, float* d, float* s16, float* s32) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m; ++r) {
        if (x_bf16)
            quantize_row(static_cast<const uint16_t*>(x) + r * k, k, q + r * k, d + r * (k / 4), s16 + r * (k / 16),
                         s32 + r * (k / 32));
        else
            quantize_row(static_cast<const float*>(x) + r * k, k, q + r * k, d + r * (k / 4), s16 + r * (k / 16),
                         s32 + r * (k / 32));
    }
}

struct ActBuffers {  // one product's quantized activations, reused across calls
    std::vector<int8_t> q;
    std::vector<float> d, s16, s32;
    QuantActs resize(int64_t m, int64_t k) {
        q.resize(m * k), d.resize(m * (k / 4)), s16.resize(m * (k / 16)), s32.resize(m * (k / 32));
        return {q.data(), d.data(), s16.data(), s32.data(), k};
    }
};

bool amx_takes(int isa, int type, int x_bf16, int y_bf16, int64_t m, int64_t rows) {
    return isa == AMX && x_bf16 && y_bf16 && m <= 64 && rows % 16 == 0 && (type == Q4_0 || type == Q4_1 || type == Q8_0);
}

}  // namespace

extern "C" int quant_isa_usable(int isa) { return usable(isa); }

extern "C" int quant_type_supported(int type) { return block_bytes(type) > 0; }

// Activations as the products quantize them (QuantActs), for k a multiple of 32.
extern "C" void quant_activations(const void* x, int x_bf16, int64_t m, int64_t k, int8_t* q, float* d, float* s16,
                                  float* s32) {
    quantize_rows(x, x_bf16, m, k, q, d, s16, s32);
}

// y [m, sum of rows] = x [m, k] . [W_0; W_1; ...]^T, each part W_p rows[p] x k in blocks of types[p]
// (row-major, as in the file). x and y are float32 or bfloat16 (x_bf16, y_bf16). Returns 0, doing
// nothing, for an instruction set this CPU lacks, a type it does not know or a k its blocks do not divide.
extern "C" int quant_matmul(const void* x, int x_bf16, int64_t m, int64_t k, int parts, const int* types,
                            const uint8_t* const* weights, const int64_t* rows, void* y, int y_bf16, int isa,
                            int threads) {
    if (!usable(isa) || m < 0 || k <= 0) return 0;
    int64_t total = 0;
    bool quantized = false;  // whether any part needs the activations in int8
    int vector_isa = isa;    // what AMX does not take goes to the best of the others
    while (vector_isa == AMX || !usable(vector_isa)) --vector_isa;
    for (int p = 0; p < parts; ++p) {
        if (block_bytes(types[p]) == 0 || k % block_values(types[p]) || rows[p] < 0) return 0;
        total += rows[p];
        quantized |= !amx_takes(isa, types[p], x_bf16, y_bf16, m, rows[p]);
    }
    if (m == 0 || total == 0) return 1;
    // the calling thread's buffers (thread_local: the team's threads reach them through these pointers)
    thread_local ActBuffers buffers;
    thread_local std::vector<float> scratch;
    const QuantActs acts = quantized ? buffers.resize(m, k) : QuantActs{};
    int8_t* q = buffers.q.data();
    float *d = buffers.d.data(), *s16 = buffers.s16.data(), *s32 = buffers.s32.data();
    float* out = static_cast<float*>(y);
    if (y_bf16) scratch.resize(m * total), out = scratch.data();
#pragma omp parallel num_threads(threads)
    {
        if (quantized) quantize_rows(x, x_bf16, m, k, q, d, s16, s32);
#pragma omp barrier
        int team = 1, me = 0;
#ifdef _OPENMP
        team = omp_get_num_threads(), me = omp_get_thread_num();
#endif
        int64_t column = 0;
        for (int p = 0; p < parts; ++p) {
            const int type = types[p];
            if (!amx_takes(isa, type, x_bf16, y_bf16, m, rows[p])) {
                const QuantGemm g{type, weights[p], k / block_values(type) * block_bytes(type), rows[p], acts, m,
                                  out + column, total};
                ROWS[vector_isa](&g, rows[p] * me / team, rows[p] * (me + 1) / team);
            }
            column += rows[p];
        }
        if (y_bf16) {
#pragma omp barrier
            column = 0;
            for (int p = 0; p < parts; ++p) {
                if (!amx_takes(isa, types[p], x_bf16, y_bf16, m, rows[p])) {
#pragma omp for schedule(static)
                    for (int64_t r = 0; r < m; ++r)
                        for (int64_t n = column; n < column + rows[p]; ++n)
                            static_cast<uint16_t*>(y)[r * total + n] = to_bf16(out[r * total + n]);
                }
                column += rows[p];
            }
        }
    }
    int64_t column = 0;
    for (int p = 0; p < parts; ++p) {
        if (amx_takes(isa, types[p], x_bf16, y_bf16, m, rows[p]))
            gllm_quant_amx_bf16(types[p], static_cast<const uint16_t*>(x), m, k, rows[p], weights[p],
                                k / 32 * block_bytes(types[p]), static_cast<uint16_t*>(y) + column, total, threads);
        column += rows[p];
    }
    return 1;
}

// out [count, k] = rows ids of a matrix of k-value rows in blocks of type, dequantized as gguf does;
// float32 or bfloat16 (rounded to nearest even). Returns 0 for a type it does not know.
extern "C" int quant_dequantize_rows(int type, const uint8_t* w, int64_t k, const int64_t* ids, int64_t count,
                                     void* out, int out_bf16, int threads) {
    if (block_bytes(type) == 0 || k % block_values(type)) return 0;
    const int64_t values = block_values(type), row_bytes = k / values * block_bytes(type);
#pragma omp parallel for num_threads(threads) schedule(static) if (count * k >= (1 << 16))
    for (int64_t i = 0; i < count; ++i) {
        float block[256];
        for (int64_t b = 0; b < k / values; ++b) {
            dequantize_block(type, w + ids[i] * row_bytes + b * block_bytes(type), block);
            for (int64_t v = 0; v < values; ++v) {
                if (out_bf16) static_cast<uint16_t*>(out)[i * k + b * values + v] = to_bf16(block[v]);
                else static_cast<float*>(out)[i * k + b * values + v] = block[v];
            }
        }
    }
    return 1;
}
