// Registers csrc/prompt_hash.cpp's functions on the extension module (one PYBIND11_MODULE, in
// csrc/block_copy.cpp, for the whole extension).
#pragma once

#include <torch/extension.h>

void register_prompt_hash(py::module_& m);
