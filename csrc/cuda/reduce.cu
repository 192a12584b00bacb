// Column sums of per-block partials: the second, deterministic stage of the weight and bias
// gradients (norm dgamma/dbeta, bias-GeLU dbias). Each block owns 32 columns; its 32 x 16
// threads stride down the partial rows and combine through shared memory.
#include "common.cuh"

namespace mlite {
namespace {

constexpr int kCols = 32;
constexpr int kRows = 16;

template <typename T>
__global__ void reduce_columns_kernel(const float* __restrict__ partials, int64_t n_partials, int64_t cols,
                                      T* __restrict__ out) {
  __shared__ float tile[kRows][kCols + 1];
  const int64_t col = blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x;
  float acc = 0.f;
  if (col < cols) {
    for (int64_t r = threadIdx.y; r < n_partials; r += kRows) acc += partials[r * cols + col];
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float total = 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) total += tile[r][threadIdx.x];
    out[col] = static_cast<T>(total);
  }
}

}  // namespace

void reduce_column_partials(const at::Tensor& partials, at::Tensor& out) {
  const int64_t n_partials = partials.size(0), cols = partials.size(1);
  if (cols == 0) return;
  const dim3 block(kCols, kRows);
  const dim3 grid(static_cast<unsigned>((cols + kCols - 1) / kCols));
  auto stream = at::cuda::getCurrentCUDAStream();
  MLITE_DISPATCH_TYPES(out.scalar_type(), "reduce_column_partials", [&] {
    reduce_columns_kernel<scalar_t><<<grid, block, 0, stream>>>(partials.data_ptr<float>(), n_partials, cols,
                                                                out.data_ptr<scalar_t>());
  });
  check_launch();
}

}  // namespace mlite
