// Matrix products straight from llama.cpp's block-quantized weights (Q4_0, Q4_1, Q8_0: blocks of 32
// values along a row) with Intel AMX, for steps of at most 64 rows (decodes).
//
// A decode step reads every weight once, so its speed is the speed of reading the weights. Stored as
// bfloat16 they take 2 bytes a value; kept in their blocks, 0.5625 (Q4_0), 0.625 (Q4_1) or 1.0625 (Q8_0).
// Each 16-row by 32-column tile of a weight is expanded to bfloat16 in registers, exactly as the file's
// reference dequantization computes it (float32, then rounded to nearest even), and multiplied with
// AMX: the results are those of a bfloat16 product over the dequantized weights, up to the order of the
// float32 sums. Built only where the compiler targets AMX-BF16 and AVX512-BF16 (-march=native on such a
// CPU); elsewhere block_matmul_ready() says no and the engine keeps its dense weights.
//
// Weight layout (the loader's repacking, gllm/ops/linear.py): for tile t of 16 rows and block column j,
// quants [t][j][16 rows][16 or 32 bytes], scales [t][j][16] float16, mins (Q4_1) [t][j][16] float16.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

enum Kind { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
constexpr int MAX_M_TILES = 4;  // tiles 2..5 accumulate up to 64 rows of output
// Rounding stated in the instruction: a product and a sum the compiler may not fuse into one FMA.
constexpr int EXACT = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// One tile (16 rows, one block column) of a weight as bfloat16 rows of 32 values: AMX's A operand.
// Values come out as gguf's reference dequantization computes them: float32 products (then the minimum
// added for Q4_1, the quant less 8 for Q4_0), rounded to nearest even.
template <int KIND>
inline void expand(const uint8_t* q, const uint16_t* d, const uint16_t* m, uint16_t* out) {
    alignas(64) float scales[16], mins[16];
    _mm512_store_ps(scales, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d))));
    if (KIND == Q4_1) _mm512_store_ps(mins, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m))));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int r = 0; r < 16; ++r) {
        const __m512 scale = _mm512_set1_ps(scales[r]);
        __m512i row;
        if (KIND == Q8_0) {
            const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * 32));
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
            row = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, scale), _mm512_mul_ps(lo, scale));
        } else {  // 16 possible values: compute them once, then look the row's 32 quants up
            const __m512 values = KIND == Q4_0 ? _mm512_mul_ps(scale, _mm512_sub_ps(iota, _mm512_set1_ps(8.0f)))
                                               : _mm512_add_round_ps(_mm512_mul_round_ps(scale, iota, EXACT),
                                                                     _mm512_set1_ps(mins[r]), EXACT);
            const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * 16));
            const __m256i quants = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble),  // values 16-31
                                                    _mm_and_si128(bytes, nibble));                    // values 0-15
            row = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(quants), table);
        }
        _mm512_store_si512(reinterpret_cast<__m512i*>(out + r * 32), row);
    }
}

// y [rows, n] = x [rows, k] . W^T for rows <= 64, bfloat16 in and out, float32 sums. AMX multiplies
// W (A: 16 output columns x 32 k) by x transposed (B: 32 k x 16 rows, pairs of k interleaved).
template <int KIND>
void block_matmul(const uint16_t* x, int64_t rows, int64_t k, int64_t n, const uint8_t* quants,
                  const uint16_t* scales, const uint16_t* mins, uint16_t* y, int threads) {
    const int64_t m_tiles = (rows + 15) / 16, k_blocks = k / 32, n_tiles = n / 16;
    const int64_t q_bytes = KIND == Q8_0 ? 32 : 16;
    // x transposed for AMX's B operand: [m tile][k block][16 pairs of k][16 rows], each entry a pair of
    // bfloat16 (32 bits) taken whole from a row of x.
    std::vector<uint32_t> xt(m_tiles * k_blocks * 256, 0);
    for (int64_t r = 0; r < rows; ++r) {
        uint32_t* to = xt.data() + r / 16 * k_blocks * 256 + r % 16;
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
        auto expand_tile = [&](int64_t t, int64_t j) {
            const int64_t at = t * k_blocks + j;
            expand<KIND>(quants + at * 16 * q_bytes, scales + at * 16, KIND == Q4_1 ? mins + at * 16 : nullptr, a[j & 1]);
        };
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tiles; ++t) {
            expand_tile(t, 0);
            _tile_zero(2);  // the tile instructions are asm statements: one per statement
            _tile_zero(3);
            _tile_zero(4);
            _tile_zero(5);
            for (int64_t j = 0; j < k_blocks; ++j) {
                if (j + 1 < k_blocks) expand_tile(t, j + 1);  // its stores land while this tile multiplies
                _tile_loadd(0, a[j & 1], 64);
                const uint32_t* b = xt.data() + j * 256;
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
                for (int64_t r = s * 16; r < std::min<int64_t>(rows, s * 16 + 16); ++r) {
                    for (int o = 0; o < 16; ++o) column[o] = c[o * 16 + r % 16];
                    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_load_ps(column));
                    std::memcpy(y + r * n + t * 16, &packed, 32);
                }
            }
        }
        _tile_release();
    }
}

}  // namespace

extern "C" int block_matmul_ready() {  // the kernel is built, and Linux lets this process use AMX tiles
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

extern "C" int block_matmul_bf16(int kind, const uint16_t* x, int64_t rows, int64_t k, int64_t n,
                                 const uint8_t* quants, const uint16_t* scales, const uint16_t* mins, uint16_t* y,
                                 int threads) {
    if (rows < 1 || rows > 16 * MAX_M_TILES || k % 32 || n % 16) return 0;
    if (kind == Q4_0) block_matmul<Q4_0>(x, rows, k, n, quants, scales, mins, y, threads);
    else if (kind == Q4_1) block_matmul<Q4_1>(x, rows, k, n, quants, scales, mins, y, threads);
    else if (kind == Q8_0) block_matmul<Q8_0>(x, rows, k, n, quants, scales, mins, y, threads);
    else return 0;
    return 1;
}

#else  // no AMX here: the engine keeps its dense weights

extern "C" int block_matmul_ready() { return 0; }
extern "C" int block_matmul_bf16(int, const uint16_t*, int64_t, int64_t, int64_t, const uint8_t*, const uint16_t*,
                                 const uint16_t*, uint16_t*, int) {
    return 0;
}

#endif
