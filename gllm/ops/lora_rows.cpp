// Low-rank updates of rows under different LoRA adapters, on the CPU (gllm/lora/grouped.py, MixedRows).
//
// The rows come grouped by adapter: group g is rows[starts[g]] .. rows[starts[g + 1] - 1] of the batch, under
// the adapter at place g of the step's stacks (a: [adapters, in, R]; each output part's b: [adapters, w, out]).
// One call per site (lora_site), two passes, like the Triton kernels of gllm/lora/triton_lora.py:
//   shrink: u[i, :] = x[rows[i], :] @ a[g]                       (float32 u, summed in float32)
//   expand: y[rows[i], out0 + n] += u[i, col0 + :w] @ b[g][:, n]  (per projection; float32 sums, one rounding)
// Each adapter's matrices are read in place, once for every ROW_BLOCK rows of its group: no padding to the
// busiest adapter, no gathered copies, and one adapter's many decode rows read it about once. OpenMP
// across groups, row blocks (and column tiles).

#include <algorithm>
#include <cstdint>

#include "bf16.h"
#include <vector>


namespace {

constexpr int64_t COLUMN_TILE = 256;  // output columns one expand task sums
constexpr int64_t ROW_BLOCK = 8;      // rows of one group that share each read of the adapter
constexpr int MAX_RANK = 256;         // total rank of a site the kernel takes (it refuses more)

struct Block {  // up to ROW_BLOCK rows of one group: rows list [first, first + count), adapter g
    int64_t g, first, count;
};

std::vector<Block> blocks(const int32_t* starts, int64_t groups) {
    std::vector<Block> out;
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t first = starts[g]; first < starts[g + 1]; first += ROW_BLOCK)
            out.push_back({g, first, std::min<int64_t>(ROW_BLOCK, starts[g + 1] - first)});
    return out;
}

template <typename T>
void shrink_block(const T* x, int64_t sx, const int32_t* rows, Block b, const T* a, int64_t d_in, int64_t rank,
                  float* u) {
    const T* ag = a + b.g * d_in * rank;
    float acc[ROW_BLOCK][MAX_RANK] = {};
    for (int64_t j = 0; j < d_in; ++j) {
        const T* aj = ag + j * rank;
        for (int64_t i = 0; i < b.count; ++i) {
            const float xj = load(x[int64_t(rows[b.first + i]) * sx + j]);
            float* acc_i = acc[i];
#pragma omp simd
            for (int64_t r = 0; r < rank; ++r) acc_i[r] += xj * load(aj[r]);
        }
    }
    for (int64_t i = 0; i < b.count; ++i) std::copy(acc[i], acc[i] + rank, u + (b.first + i) * rank);
}

struct Part {  // one projection of the site: y[:, out0 : out0 + out_cols] += u[:, col0 : col0 + width] @ b
    int64_t col0, width, out0, out_cols;
};

template <typename T>
void expand_tile(const float* u, int64_t rank, const int32_t* rows, Block blk, Part p, const T* b, int64_t start,
                 T* y, int64_t sy) {
    const int64_t n = std::min(p.out_cols, start + COLUMN_TILE) - start;
    const T* bg = b + blk.g * p.width * p.out_cols + start;
    float acc[ROW_BLOCK][COLUMN_TILE] = {};
    for (int64_t w = 0; w < p.width; ++w) {
        const T* bw = bg + w * p.out_cols;
        for (int64_t i = 0; i < blk.count; ++i) {
            const float uw = u[(blk.first + i) * rank + p.col0 + w];
            float* acc_i = acc[i];
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) acc_i[c] += uw * load(bw[c]);
        }
    }
    for (int64_t i = 0; i < blk.count; ++i) {
        T* yi = y + int64_t(rows[blk.first + i]) * sy + p.out0 + start;
        for (int64_t c = 0; c < n; ++c) store(yi + c, load(yi[c]) + acc[i][c]);
    }
}

// One site in one call: the shrink of every row block, then (after the barrier) the expand of every part,
// row block and column tile.
template <typename T>
void site(const T* x, int64_t sx, T* y, int64_t sy, const int32_t* rows, const int32_t* starts, int64_t groups,
          const T* a, int64_t d_in, int64_t rank, int64_t num_parts, const int64_t* part_info, const int64_t* b_ptrs,
          float* u, int threads) {
    const std::vector<Block> work = blocks(starts, groups);
    struct Task {
        int64_t part, block, start;
    };
    std::vector<Task> tasks;
    for (int64_t p = 0; p < num_parts; ++p)
        for (int64_t k = 0; k < int64_t(work.size()); ++k)
            for (int64_t start = 0; start < part_info[4 * p + 3]; start += COLUMN_TILE) tasks.push_back({p, k, start});
    const int64_t shrinks = int64_t(work.size()), expands = int64_t(tasks.size());
#pragma omp parallel num_threads(threads) if (expands > 1)
    {
#pragma omp for
        for (int64_t t = 0; t < shrinks; ++t) shrink_block(x, sx, rows, work[t], a, d_in, rank, u);
#pragma omp for
        for (int64_t t = 0; t < expands; ++t) {
            const Task task = tasks[t];
            const int64_t* info = part_info + 4 * task.part;
            const Part part{info[0], info[1], info[2], info[3]};
            expand_tile(u, rank, rows, work[task.block], part, reinterpret_cast<const T*>(b_ptrs[task.part]),
                        task.start, y, sy);
        }
    }
}

}  // namespace

#define LORA_KERNELS(T, suffix)                                                                                 \
    extern "C" int lora_site_##suffix(const T* x, int64_t sx, T* y, int64_t sy, const int32_t* rows,             \
                                      const int32_t* starts, int64_t groups, const T* a, int64_t d_in,           \
                                      int64_t rank, int64_t num_parts, const int64_t* part_info,                 \
                                      const int64_t* b_ptrs, float* u, int threads) {                            \
        if (rank > MAX_RANK) return 1;                                                                          \
        site<T>(x, sx, y, sy, rows, starts, groups, a, d_in, rank, num_parts, part_info, b_ptrs, u, threads);   \
        return 0;                                                                                               \
    }

LORA_KERNELS(float, f32)
LORA_KERNELS(bf16, bf16)
