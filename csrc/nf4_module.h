// The Python module definition shared by lora_kernels._C (CPU) and lora_kernels._C_cuda (CUDA):
// the same three functions with the same names, docstrings and keyword arguments.
#pragma once

#include <torch/extension.h>

#include "nf4_docs.h"

namespace lora_kernels {

template <class QuantizeBlocks, class QuantizeAbsmaxNested, class Dequantize>
void define_nf4_module(pybind11::module_& m, const char* doc, QuantizeBlocks quantize_blocks,
                       QuantizeAbsmaxNested quantize_absmax_nested, Dequantize dequantize) {
  namespace py = pybind11;
  m.doc() = doc;
  m.def("quantize_blocks", quantize_blocks, docs::kQuantizeBlocks, py::arg("w"), py::arg("blocksize"));
  m.def("quantize_absmax_nested", quantize_absmax_nested, docs::kQuantizeAbsmaxNested, py::arg("absmax"),
        py::arg("offset"), py::arg("code"));
  m.def("dequantize", dequantize, docs::kDequantize, py::arg("packed"), py::arg("absmax"),
        py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"), py::arg("code"), py::arg("n"),
        py::arg("blocksize"), py::arg("dtype"), py::arg("out") = py::none());
}

}  // namespace lora_kernels
