// Quantized products with AVX512-VNNI (Intel since Cascade Lake, AMD since Zen 4): the EVEX form of
// dpbusd on 256-bit vectors (AVX512-VL), which CPUs without AVX-VNNI's VEX form (Zen 4, Ice Lake) have. 256 bits, not 512: Zen 4 splits 512-bit operations in two, and a decode step is bound by
// reading the weights. The kernels are quant_x86.h's, as for AVX2.

#include "quant_formats.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__FMA__) && defined(__F16C__)
#include "quant_x86.h"

namespace {
struct Avx512Vnni {
    static __m256i dot(__m256i w, __m256i a) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a); }
};
}  // namespace

extern "C" int gllm_quant_built_avx512vnni() { return 1; }
extern "C" void gllm_quant_rows_avx512vnni(const QuantGemm* g, int64_t n0, int64_t n1) {
    gemm_any<Avx512Vnni>(*g, n0, n1);
}

#else  // the compiler cannot target AVX512-VNNI: never chosen

extern "C" int gllm_quant_built_avx512vnni() { return 0; }
extern "C" void gllm_quant_rows_avx512vnni(const QuantGemm*, int64_t, int64_t) {}

#endif
