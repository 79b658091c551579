// Tensors at the runtime's boundaries: views the caller owns, and buffers the runtime returns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace edgesmith {

/// Element types an artifact's inputs and outputs may have (NumPy names in manifests).
enum DType : int32_t {
  DTYPE_BOOL = 0,
  DTYPE_INT8,
  DTYPE_INT16,
  DTYPE_INT32,
  DTYPE_INT64,
  DTYPE_UINT8,
  DTYPE_UINT16,
  DTYPE_UINT32,
  DTYPE_UINT64,
  DTYPE_FLOAT16,
  DTYPE_FLOAT32,
  DTYPE_FLOAT64,
};

/// The DType of a NumPy dtype name ("float32"); throws Error(ERROR_CODE_INVALID_ARGUMENT) if unknown.
DType dtype_from_name(const std::string& name);

/// The NumPy name of a DType ("float32").
const char* dtype_name(DType dtype);

/// Size of one element in bytes.
size_t dtype_size(DType dtype);

/// Number of elements of a shape (1 for a scalar shape `{}`).
int64_t shape_numel(const std::vector<int64_t>& shape);

/// A borrowed, C-contiguous tensor: the caller keeps `data` alive for the duration of the call.
struct TensorView {
  const void* data = nullptr;
  DType dtype = DTYPE_FLOAT32;
  std::vector<int64_t> shape;
};

/// An owned, C-contiguous tensor whose buffer is 64-byte aligned.
class Tensor {
 public:
  /// An empty float32 scalar-less tensor (no buffer).
  Tensor() = default;

  /// Allocate an uninitialised tensor of this dtype and shape.
  Tensor(DType dtype, std::vector<int64_t> shape);

  /// Element type.
  DType dtype() const noexcept { return dtype_; }

  /// Static shape.
  const std::vector<int64_t>& shape() const noexcept { return shape_; }

  /// Size of the buffer in bytes.
  size_t byte_size() const noexcept { return byte_size_; }

  /// Mutable buffer.
  void* data() noexcept { return data_.get(); }

  /// Read-only buffer.
  const void* data() const noexcept { return data_.get(); }

  /// A view of this tensor (valid while the tensor lives).
  TensorView view() const;

 private:
  DType dtype_ = DTYPE_FLOAT32;
  std::vector<int64_t> shape_;
  size_t byte_size_ = 0;
  std::shared_ptr<uint8_t> data_;
};

}  // namespace edgesmith
