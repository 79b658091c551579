#include "runtime/tensor.h"

#include <cstdlib>
#include <limits>
#include <new>
#include <utility>

#include "common/error.h"
#include "common/strings.h"

namespace edgesmith {

namespace {

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};

// Indexed by DType value.
constexpr DTypeInfo DTYPES[] = {
    {DTYPE_BOOL, "bool", 1},       {DTYPE_INT8, "int8", 1},       {DTYPE_INT16, "int16", 2},
    {DTYPE_INT32, "int32", 4},     {DTYPE_INT64, "int64", 8},     {DTYPE_UINT8, "uint8", 1},
    {DTYPE_UINT16, "uint16", 2},   {DTYPE_UINT32, "uint32", 4},   {DTYPE_UINT64, "uint64", 8},
    {DTYPE_FLOAT16, "float16", 2}, {DTYPE_FLOAT32, "float32", 4}, {DTYPE_FLOAT64, "float64", 8},
};

constexpr size_t TENSOR_ALIGNMENT = 64;

}  // namespace

DType dtype_from_name(const std::string& name) {
  for (const DTypeInfo& info : DTYPES) {
    if (name == info.name) return info.dtype;
  }
  throw Error(ERROR_CODE_INVALID_ARGUMENT,
              "dtype " + string_quote(name) +
                  " is not one edgesmith knows (bool, int8..int64, uint8..uint64, float16, "
                  "float32, float64)");
}

const char* dtype_name(DType dtype) {
  const auto index = static_cast<size_t>(dtype);
  return index < std::size(DTYPES) ? DTYPES[index].name : "unknown";
}

size_t dtype_size(DType dtype) {
  const auto index = static_cast<size_t>(dtype);
  return index < std::size(DTYPES) ? DTYPES[index].size : 0;
}

int64_t shape_numel(const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (const int64_t dim : shape) {
    if (dim < 0) {
      throw Error(ERROR_CODE_INVALID_ARGUMENT, "a shape has the negative dimension " +
                                                   std::to_string(dim));
    }
    if (dim != 0 && numel > std::numeric_limits<int64_t>::max() / dim) {
      throw Error(ERROR_CODE_INVALID_ARGUMENT, "a shape has more than 2^63 elements");
    }
    numel *= dim;
  }
  return numel;
}

Tensor::Tensor(DType dtype, std::vector<int64_t> shape) : dtype_(dtype), shape_(std::move(shape)) {
  const auto numel = static_cast<uint64_t>(shape_numel(shape_));
  const size_t item = dtype_size(dtype_);
  if (item == 0) throw Error(ERROR_CODE_INVALID_ARGUMENT, "a tensor has an unknown dtype");
  if (numel > (std::numeric_limits<size_t>::max() - TENSOR_ALIGNMENT) / item) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "a tensor of " + std::to_string(numel) +
                                                 " elements does not fit in memory");
  }
  byte_size_ = static_cast<size_t>(numel) * item;
  // aligned_alloc wants a multiple of the alignment; allocate at least one block so data() is
  // never null, even for an empty tensor.
  const size_t rounded = (byte_size_ / TENSOR_ALIGNMENT + 1) * TENSOR_ALIGNMENT;
  void* buffer = std::aligned_alloc(TENSOR_ALIGNMENT, rounded);
  if (buffer == nullptr) throw std::bad_alloc();
  data_ = std::shared_ptr<uint8_t>(static_cast<uint8_t*>(buffer), [](uint8_t* p) { std::free(p); });
}

TensorView Tensor::view() const {
  TensorView view;
  view.data = data_.get();
  view.dtype = dtype_;
  view.shape = shape_;
  return view;
}

}  // namespace edgesmith
