// Quantized products with AVX-VNNI (Intel since Alder Lake and Sapphire Rapids, AMD since Zen 5): dpbusd
// sums four u8 x s8 products into int32 in one instruction, where AVX2 takes two (maddubs, madd). The
// kernels are quant_x86.h's, as for AVX2.

#include "quant_formats.h"

#if defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "quant_x86.h"

namespace {
struct AvxVnni {
    static __m256i dot(__m256i w, __m256i a) { return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, a); }
};
}  // namespace

extern "C" int gllm_quant_built_avxvnni() { return 1; }
extern "C" void gllm_quant_rows_avxvnni(const QuantGemm* g, int64_t n0, int64_t n1) { gemm_any<AvxVnni>(*g, n0, n1); }

#else  // the compiler cannot target AVX-VNNI: never chosen

extern "C" int gllm_quant_built_avxvnni() { return 0; }
extern "C" void gllm_quant_rows_avxvnni(const QuantGemm*, int64_t, int64_t) {}

#endif
