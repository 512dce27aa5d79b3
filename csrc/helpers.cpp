// Dataset index builders for megatron_ki/data (plain pybind11 + NumPy, no torch headers).
//
// build_sample_idx: where each fixed-length GPT sample starts, as (position in doc_idx, offset in document).
// build_blending_indices: which dataset and which of its samples feed each position of a blended dataset.
// megatron_ki/data/helpers.py holds NumPy implementations that the tests prove return identical arrays.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

// Sample i covers tokens [i * seq_length, i * seq_length + seq_length] of the documents concatenated in
// doc_idx order (seq_length + 1 tokens; consecutive samples share one token, as in Megatron-LM).
// Row i holds the (doc_idx position, offset) of the first token of sample i; row num_samples closes the last.
py::array_t<int64_t> build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes_,
                                      py::array_t<int64_t, py::array::c_style | py::array::forcecast> doc_idx_,
                                      int64_t seq_length, int64_t num_samples) {
  if (seq_length <= 0) throw std::invalid_argument("build_sample_idx: seq_length must be positive");
  if (num_samples < 0) throw std::invalid_argument("build_sample_idx: num_samples must be >= 0");
  auto sizes = sizes_.unchecked<1>();
  auto doc_idx = doc_idx_.unchecked<1>();
  const int64_t n_docs = doc_idx.shape(0);
  int64_t total = 0;
  for (int64_t i = 0; i < n_docs; ++i) {
    const int64_t d = doc_idx(i);
    if (d < 0 || d >= sizes.shape(0)) throw std::out_of_range("build_sample_idx: doc_idx entry out of range");
    total += sizes(d);
  }
  if (num_samples * seq_length > total - 1)
    throw std::invalid_argument("build_sample_idx: not enough tokens for num_samples samples");
  py::array_t<int64_t> result({num_samples + 1, static_cast<int64_t>(2)});
  auto out = result.mutable_unchecked<2>();
  {
    py::gil_scoped_release release;
    int64_t pos = 0;       // position in doc_idx
    int64_t doc_start = 0; // global token index of doc_idx[pos]'s first token
    for (int64_t s = 0; s <= num_samples; ++s) {
      const int64_t target = s * seq_length;
      // advance to the document holding token `target` (skipping empty documents)
      while (doc_start + sizes(doc_idx(pos)) <= target) {
        doc_start += sizes(doc_idx(pos));
        ++pos;
      }
      out(s, 0) = pos;
      out(s, 1) = target - doc_start;
    }
  }
  return result;
}

// Greedy blending (Megatron-LM's rule): position i goes to the dataset whose achieved count lags its target
// weight * max(i, 1) the most (ties to the lowest index).
std::pair<py::array_t<int16_t>, py::array_t<int64_t>> build_blending_indices(
    py::array_t<double, py::array::c_style | py::array::forcecast> weights_, int64_t size) {
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  auto weights = weights_.unchecked<1>();
  const int64_t n = weights.shape(0);
  if (n <= 0 || n > 32767) throw std::invalid_argument("build_blending_indices: need 1..32767 datasets");
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  auto di = dataset_index.mutable_unchecked<1>();
  auto dsi = dataset_sample_index.mutable_unchecked<1>();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> current(n, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double denom = static_cast<double>(i > 1 ? i : 1);
      int64_t best = 0;
      double best_err = weights(0) * denom - static_cast<double>(current[0]);
      for (int64_t d = 1; d < n; ++d) {
        const double err = weights(d) * denom - static_cast<double>(current[d]);
        if (err > best_err) {
          best_err = err;
          best = d;
        }
      }
      di(i) = static_cast<int16_t>(best);
      dsi(i) = current[best];
      ++current[best];
    }
  }
  return {dataset_index, dataset_sample_index};
}

PYBIND11_MODULE(megatron_ki_data_helpers, m) {
  m.doc() = "megatron_ki dataset index helpers";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_samples"));
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"));
}
