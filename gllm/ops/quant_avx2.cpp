// Quantized products with AVX2 (every x86-64 CPU since 2013): u8 x s8 products summed in pairs by
// maddubs, then in fours (or scaled by a group's scale) by madd. The kernels are in quant_x86.h.

#include "quant_formats.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "quant_x86.h"

namespace {
struct Avx2 {
    static __m256i dot(__m256i w, __m256i a) {
        return _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1));
    }
};
}  // namespace

extern "C" int gllm_quant_built_avx2() { return 1; }
extern "C" void gllm_quant_rows_avx2(const QuantGemm* g, int64_t n0, int64_t n1) { gemm_any<Avx2>(*g, n0, n1); }

#else  // the compiler cannot target AVX2: never chosen

extern "C" int gllm_quant_built_avx2() { return 0; }
extern "C" void gllm_quant_rows_avx2(const QuantGemm*, int64_t, int64_t) {}

#endif
