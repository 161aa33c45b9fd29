// Matrix products straight from llama.cpp's Q4_0, Q4_1 and Q8_0 blocks with Intel AMX, for steps of at
// most 64 rows of bfloat16 activations (decodes).
//
// Each 16-row by 32-column tile of a weight is expanded to bfloat16 in registers, exactly as the file's
// reference dequantization computes it (float32, then rounded to nearest even), and multiplied with
// AMX: the results are those of a bfloat16 product over the dequantized weights, up to the order of the
// float32 sums (no int8 rounding of the activations, unlike the other paths). The blocks are read where
// they lie, rows one after another as in the GGUF file. Built where the compiler targets AMX-BF16 and
// AVX512-BF16; used where the CPU has them and Linux grants the process AMX tiles.

#include "quant_formats.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>

namespace {

constexpr int MAX_M_TILES = 4;  // tiles 2..5 accumulate up to 64 rows of output
// Rounding stated in the instruction: a product and a sum the compiler may not fuse into one FMA.
constexpr int EXACT = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// One tile (16 weight rows from ``blk``, ``stride`` bytes apart, one block each) as bfloat16 rows of 32
// values: AMX's A operand. Values come out as gguf's reference dequantization computes them: float32
// products (then the minimum added for Q4_1, the quant less 8 for Q4_0), rounded to nearest even.
template <int KIND>
inline void expand(const uint8_t* blk, int64_t stride, uint16_t* out) {
    alignas(64) uint16_t d[16], m[16];
    alignas(64) float scales[16], mins[16];
    for (int r = 0; r < 16; ++r) {
        std::memcpy(d + r, blk + r * stride, 2);
        if (KIND == Q4_1) std::memcpy(m + r, blk + r * stride + 2, 2);
    }
    _mm512_store_ps(scales, _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(d))));
    if (KIND == Q4_1) _mm512_store_ps(mins, _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(m))));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int r = 0; r < 16; ++r) {
        const uint8_t* q = blk + r * stride + (KIND == Q4_1 ? 4 : 2);
        const __m512 scale = _mm512_set1_ps(scales[r]);
        __m512i row;
        if (KIND == Q8_0) {
            const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
            row = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, scale), _mm512_mul_ps(lo, scale));
        } else {  // 16 possible values: compute them once, then look the row's 32 quants up
            const __m512 values = KIND == Q4_0 ? _mm512_mul_ps(scale, _mm512_sub_ps(iota, _mm512_set1_ps(8.0f)))
                                               : _mm512_add_round_ps(_mm512_mul_round_ps(scale, iota, EXACT),
                                                                     _mm512_set1_ps(mins[r]), EXACT);
            const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
            const __m256i quants = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble),  // values 16-31
                                                    _mm_and_si128(bytes, nibble));                    // values 0-15
            row = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(quants), table);
        }
        _mm512_store_si512(reinterpret_cast<__m512i*>(out + r * 32), row);
    }
}

// y [rows, ldy] (columns 0..n-1) = x [rows, k] . W^T for rows <= 64, bfloat16 in and out, float32 sums.
// AMX multiplies W (A: 16 output columns x 32 k) by x transposed (B: 32 k x 16 rows, pairs of k
// interleaved).
template <int KIND>
void amx_matmul(const uint16_t* x, int64_t rows, int64_t k, int64_t n, const uint8_t* w, int64_t row_bytes,
                uint16_t* y, int64_t ldy, int threads) {
    const int64_t m_tiles = (rows + 15) / 16, k_blocks = k / 32, n_tiles = n / 16;
    constexpr int64_t bytes = block_bytes(KIND);
    // x transposed for AMX's B operand: [m tile][k block][16 pairs of k][16 rows], each entry a pair of
    // bfloat16 (32 bits) taken whole from a row of x.
    uint32_t* xt = static_cast<uint32_t*>(std::calloc(m_tiles * k_blocks * 256, sizeof(uint32_t)));
    for (int64_t r = 0; r < rows; ++r) {
        uint32_t* to = xt + r / 16 * k_blocks * 256 + r % 16;
        for (int64_t pair = 0; pair < k / 2; ++pair) {
            uint32_t both;
            std::memcpy(&both, x + r * k + 2 * pair, 4);
            to[pair / 16 * 256 + pair % 16 * 16] = both;
        }
    }
#pragma omp parallel num_threads(threads)
    {
        TileConfig config;
        for (int t = 0; t < 2 + MAX_M_TILES; ++t) config.rows[t] = 16, config.colsb[t] = 64;
        _tile_loadconfig(&config);
        alignas(64) uint16_t a[2][16 * 32];  // tile j is expanded while tile j - 1 is multiplied
        alignas(64) float c[16 * 16];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tiles; ++t) {
            const uint8_t* tile = w + t * 16 * row_bytes;
            expand<KIND>(tile, row_bytes, a[0]);
            _tile_zero(2);  // the tile instructions are asm statements: one per statement
            _tile_zero(3);
            _tile_zero(4);
            _tile_zero(5);
            for (int64_t j = 0; j < k_blocks; ++j) {
                if (j + 1 < k_blocks) expand<KIND>(tile + (j + 1) * bytes, row_bytes, a[(j + 1) & 1]);
                _tile_loadd(0, a[j & 1], 64);
                const uint32_t* b = xt + j * 256;
                const int64_t step = k_blocks * 256;  // to the next m tile
                _tile_loadd(1, b, 64);
                _tile_dpbf16ps(2, 0, 1);
                if (m_tiles > 1) {
                    _tile_loadd(1, b + step, 64);
                    _tile_dpbf16ps(3, 0, 1);
                }
                if (m_tiles > 2) {
                    _tile_loadd(1, b + 2 * step, 64);
                    _tile_dpbf16ps(4, 0, 1);
                }
                if (m_tiles > 3) {
                    _tile_loadd(1, b + 3 * step, 64);
                    _tile_dpbf16ps(5, 0, 1);
                }
            }
            for (int64_t s = 0; s < m_tiles; ++s) {  // c [16 output columns][16 rows] -> y, transposed
                if (s == 0) _tile_stored(2, c, 64);
                if (s == 1) _tile_stored(3, c, 64);
                if (s == 2) _tile_stored(4, c, 64);
                if (s == 3) _tile_stored(5, c, 64);
                alignas(64) float column[16];
                const int64_t end = rows < s * 16 + 16 ? rows : s * 16 + 16;
                for (int64_t r = s * 16; r < end; ++r) {
                    for (int o = 0; o < 16; ++o) column[o] = c[o * 16 + r % 16];
                    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_load_ps(column));
                    std::memcpy(y + r * ldy + t * 16, &packed, 32);
                }
            }
        }
        _tile_release();
    }
    std::free(xt);
}

}  // namespace

extern "C" int gllm_quant_built_amx() { return 1; }

extern "C" int gllm_quant_amx_permitted() {  // Linux lets this process use AMX tiles
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

// 1 when done; 0 for what it does not take (another type, more than 64 rows, n not a multiple of 16).
extern "C" int gllm_quant_amx_bf16(int type, const uint16_t* x, int64_t rows, int64_t k, int64_t n, const uint8_t* w,
                                   int64_t row_bytes, uint16_t* y, int64_t ldy, int threads) {
    if (rows < 1 || rows > 16 * MAX_M_TILES || k % 32 || n % 16) return 0;
    if (type == Q4_0) amx_matmul<Q4_0>(x, rows, k, n, w, row_bytes, y, ldy, threads);
    else if (type == Q4_1) amx_matmul<Q4_1>(x, rows, k, n, w, row_bytes, y, ldy, threads);
    else if (type == Q8_0) amx_matmul<Q8_0>(x, rows, k, n, w, row_bytes, y, ldy, threads);
    else return 0;
    return 1;
}

#else  // the compiler cannot target AMX: never chosen

extern "C" int gllm_quant_built_amx() { return 0; }
extern "C" int gllm_quant_amx_permitted() { return 0; }
extern "C" int gllm_quant_amx_bf16(int, const uint16_t*, int64_t, int64_t, int64_t, const uint8_t*, int64_t, uint16_t*,
                                   int64_t, int) {
    return 0;
}

#endif
