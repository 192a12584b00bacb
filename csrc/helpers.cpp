/* Index builders for the GPT datasets, compiled by setup.py as megatron_lite.data.helpers_cpp.
 *
 * build_sample_idx       where each sample of seq_length + 1 tokens starts in the shuffled
 *                        document order (the GPT sample index)
 * build_blending_indices which dataset, and which of its samples, each blended sample is
 *
 * megatron_lite/data/helpers.py holds numpy versions that give identical arrays; the
 * algorithms are documented there.
 */

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
// The blending errors must round exactly as the numpy version's: no fused multiply-add.
#pragma GCC optimize("fp-contract=off")
#endif

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

template <typename T>
py::array_t<T> build_sample_idx(const py::array_t<int32_t, py::array::c_style | py::array::forcecast> &sizes_,
                                const py::array_t<int32_t, py::array::c_style | py::array::forcecast> &document_idx_,
                                const int32_t seq_length, const int32_t num_epochs,
                                const int64_t tokens_per_epoch) {
  if (seq_length < 1 || num_epochs < 1 || tokens_per_epoch < 2) {
    throw std::invalid_argument("build_sample_idx needs seq_length >= 1, num_epochs >= 1 and "
                                "tokens_per_epoch >= 2");
  }
  auto sizes = sizes_.unchecked<1>();
  auto document_idx = document_idx_.unchecked<1>();
  const int64_t num_documents = document_idx_.shape(0);
  // Each sample holds seq_length + 1 tokens and the next one starts on its last token.
  const int64_t num_samples = (num_epochs * tokens_per_epoch - 1) / seq_length;

  py::array_t<T> result({num_samples + 1, static_cast<int64_t>(2)});
  auto out = result.template mutable_unchecked<2>();
  bool ran_out = false;
  {
    py::gil_scoped_release release;
    int64_t doc = 0;     // position in document_idx
    int64_t offset = 0;  // token offset inside that document
    out(0, 0) = 0;
    out(0, 1) = 0;
    for (int64_t sample = 1; sample <= num_samples && !ran_out; ++sample) {
      int64_t remaining = static_cast<int64_t>(seq_length) + 1;
      while (true) {
        const int64_t doc_length = sizes[document_idx[doc]] - offset;
        remaining -= doc_length;
        if (remaining <= 0) {
          // The sample's last token lies in this document; the next sample starts there.
          offset += remaining + doc_length - 1;
          break;
        }
        if (++doc == num_documents) {
          ran_out = true;
          break;
        }
        offset = 0;
      }
      out(sample, 0) = static_cast<T>(doc);
      out(sample, 1) = static_cast<T>(offset);
    }
  }
  if (ran_out) {
    throw std::invalid_argument("build_sample_idx: the documents hold fewer than num_epochs * "
                                "tokens_per_epoch tokens");
  }
  return result;
}

py::tuple build_blending_indices(const py::array_t<double, py::array::c_style | py::array::forcecast> &weights_,
                                 const int64_t size) {
  const int64_t num_datasets = weights_.shape(0);
  if (num_datasets < 1 || num_datasets > 32767 || size < 0) {
    throw std::invalid_argument("build_blending_indices needs 1 to 32767 weights and size >= 0");
  }
  py::array_t<int16_t> dataset_index_(size);
  py::array_t<int64_t> dataset_sample_index_(size);
  auto dataset_index = dataset_index_.mutable_unchecked<1>();
  auto dataset_sample_index = dataset_sample_index_.mutable_unchecked<1>();
  auto weights = weights_.unchecked<1>();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> counts(num_datasets, 0);
    for (int64_t sample = 0; sample < size; ++sample) {
      // Take the next sample from the dataset furthest behind its share (first one on ties).
      const double position = sample > 0 ? static_cast<double>(sample) : 1.0;
      int64_t chosen = 0;
      double max_error = weights[0] * position - static_cast<double>(counts[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double error = weights[d] * position - static_cast<double>(counts[d]);
        if (error > max_error) {
          max_error = error;
          chosen = d;
        }
      }
      dataset_index[sample] = static_cast<int16_t>(chosen);
      dataset_sample_index[sample] = counts[chosen];
      counts[chosen] += 1;
    }
  }
  return py::make_tuple(dataset_index_, dataset_sample_index_);
}

PYBIND11_MODULE(helpers_cpp, m) {
  m.doc() = "GPT sample index and blending index builders (see megatron_lite/data/helpers.py)";
  m.def("build_sample_idx_int32", &build_sample_idx<int32_t>, py::arg("sizes"),
        py::arg("document_idx"), py::arg("seq_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"));
  m.def("build_sample_idx_int64", &build_sample_idx<int64_t>, py::arg("sizes"),
        py::arg("document_idx"), py::arg("seq_length"), py::arg("num_epochs"),
        py::arg("tokens_per_epoch"));
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"));
}
