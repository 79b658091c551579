// The LiteRT backend: runs a `tflite` payload (model.tflite, made by litert-torch) on LiteRT's CPU
// accelerator (XNNPACK) through the LiteRt C API of the libLiteRt.so that PyPI's ai-edge-litert
// wheel ships. Only symbols that library exports are called (the headers in third_party/litert
// declare more, e.g. LiteRtGetStatusString and the client-side CPU-option builders, which are not).
//
// Threads: the CPU accelerator's options carry `num_threads` (BackendOpenArgs::threads, else the
// manifest target's): each compiled model owns one XNNPACK thread pool that runs a call on the
// caller's thread plus num_threads - 1 workers (checked: --threads N gives N threads in
// edgesmith_backend_check's process).
//
// Concurrency: a compiled model wraps one TFLite interpreter, which serves one caller at a time, so
// the plugin keeps a pool of compiled models over the one loaded model (its flatbuffer, mmapped
// once, is shared by all of them). A caller takes an idle one or makes one, at most
// `max_concurrency` (default 1: N callers share one pool of `threads` workers, as with ORT's one
// session). Making one mutates the shared model and options (LiteRT patches magic numbers and
// appends then pops accelerator options), so compiled models are made one at a time.
//
// Load: libLiteRt.so parses the flatbuffer without verifying it (a truncated model.tflite crashes
// LiteRtCreateModelFromFile), so the plugin first runs flatbuffers' verifier with TFLite's schema
// over the file. LiteRT allocates a compiled model's tensors at its first run, so an op without a
// kernel shows only then: the plugin runs the first compiled model once on zeros at load, and a
// failure there is a load failure naming the model's custom ops, if any.
//
// Zero copy: inputs and outputs are host-memory tensor buffers wrapping the caller's input memory
// and the output tensors the runtime returns; LiteRT binds them to the interpreter as custom
// allocations, so XNNPACK reads and writes them in place. Two cases go through a per-instance
// 64-byte-aligned staging buffer instead: an input whose memory is not 64-byte aligned (LiteRT
// requires LITERT_HOST_MEMORY_BUFFER_ALIGNMENT), and the float edge of an INT8 flatbuffer that
// takes or returns quantized tensors (quantized / dequantized with the tensor's scale and zero
// point, as the toolchain's Python runner does).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "litert/c/litert_common.h"
#include "litert/c/litert_compiled_model.h"
#include "litert/c/litert_environment.h"
#include "litert/c/litert_model.h"
#include "litert/c/litert_opaque_options.h"
#include "litert/c/litert_options.h"
#include "litert/c/litert_tensor_buffer.h"
#include "tflite/converter/schema/schema_generated.h"

#include "common/backend_support.h"

#ifndef EDGESMITH_LITERT_VERSION
#define EDGESMITH_LITERT_VERSION "unknown"
#endif

namespace edgesmith {
namespace backends {
namespace {

constexpr size_t kHostAlignment = LITERT_HOST_MEMORY_BUFFER_ALIGNMENT;
/// Identifier of the CPU accelerator's options (LrtGetCpuOptionsIdentifier() upstream).
constexpr const char* kCpuOptionsIdentifier = "xnnpack";
/// TFLITE_XNNPACK_DELEGATE_FLAG_QS8 | _QU8 | _DYNAMIC_FULLY_CONNECTED: the bits
/// TfLiteXNNPackDelegateOptionsDefault() sets in LiteRT's builds.
constexpr uint32_t kXnnpackDefaultFlags = 0x1 | 0x2 | 0x8;
/// TFLITE_XNNPACK_DELEGATE_FLAG_FORCE_FP16: FP32 operators run in fp16 (Armv8.2 FEAT_FP16 cores).
constexpr uint32_t kXnnpackForceFp16 = 0x4;
/// LiteRtLogSeverity's error level (litert/c/internal/litert_logging.h, not vendored).
constexpr int64_t kLiteRtLogSeverityError = 3;

/// The enumerator name of a LiteRtStatus (libLiteRt.so does not export LiteRtGetStatusString).
std::string status_name(LiteRtStatus status) {
  switch (status) {
    case kLiteRtStatusOk: return "ok";
    case kLiteRtStatusErrorInvalidArgument: return "invalid argument";
    case kLiteRtStatusErrorMemoryAllocationFailure: return "memory allocation failure";
    case kLiteRtStatusErrorRuntimeFailure: return "runtime failure";
    case kLiteRtStatusErrorMissingInputTensor: return "missing input tensor";
    case kLiteRtStatusErrorUnsupported: return "unsupported";
    case kLiteRtStatusErrorNotFound: return "not found";
    case kLiteRtStatusErrorFileIO: return "file I/O error";
    case kLiteRtStatusErrorInvalidFlatbuffer: return "invalid flatbuffer";
    case kLiteRtStatusErrorDynamicLoading: return "dynamic loading error";
    case kLiteRtStatusErrorCompilation: return "compilation error";
    case kLiteRtStatusErrorWrongVersion: return "wrong version";
    default: return "status " + std::to_string(static_cast<int>(status));
  }
}

/// Throw std::runtime_error("<what> (<status>)") unless `status` is ok.
void status_check(LiteRtStatus status, const std::string& what) {
  if (status != kLiteRtStatusOk) throw std::runtime_error(what + " (" + status_name(status) + ")");
}

bool dtype_to_litert(DType dtype, LiteRtElementType* out) {
  switch (dtype) {
    case DTYPE_BOOL: *out = kLiteRtElementTypeBool; return true;
    case DTYPE_INT8: *out = kLiteRtElementTypeInt8; return true;
    case DTYPE_INT16: *out = kLiteRtElementTypeInt16; return true;
    case DTYPE_INT32: *out = kLiteRtElementTypeInt32; return true;
    case DTYPE_INT64: *out = kLiteRtElementTypeInt64; return true;
    case DTYPE_UINT8: *out = kLiteRtElementTypeUInt8; return true;
    case DTYPE_UINT16: *out = kLiteRtElementTypeUInt16; return true;
    case DTYPE_UINT32: *out = kLiteRtElementTypeUInt32; return true;
    case DTYPE_UINT64: *out = kLiteRtElementTypeUInt64; return true;
    case DTYPE_FLOAT16: *out = kLiteRtElementTypeFloat16; return true;
    case DTYPE_FLOAT32: *out = kLiteRtElementTypeFloat32; return true;
    case DTYPE_FLOAT64: *out = kLiteRtElementTypeFloat64; return true;
  }
  return false;
}

const char* element_type_name(LiteRtElementType type) {
  switch (type) {
    case kLiteRtElementTypeBool: return "bool";
    case kLiteRtElementTypeInt8: return "int8";
    case kLiteRtElementTypeInt16: return "int16";
    case kLiteRtElementTypeInt32: return "int32";
    case kLiteRtElementTypeInt64: return "int64";
    case kLiteRtElementTypeUInt8: return "uint8";
    case kLiteRtElementTypeUInt16: return "uint16";
    case kLiteRtElementTypeUInt32: return "uint32";
    case kLiteRtElementTypeUInt64: return "uint64";
    case kLiteRtElementTypeFloat16: return "float16";
    case kLiteRtElementTypeFloat32: return "float32";
    case kLiteRtElementTypeFloat64: return "float64";
    default: return "a type edgesmith does not take";
  }
}

std::string option_string(const nlohmann::json& options, const char* key, const std::string& fallback) {
  const auto found = options.find(key);
  return found != options.end() && found->is_string() ? found->get<std::string>() : fallback;
}

// --- owned LiteRT handles ---------------------------------------------------------------------

struct EnvironmentFree {
  void operator()(LiteRtEnvironment env) const { LiteRtDestroyEnvironment(env); }
};
struct ModelFree {
  void operator()(LiteRtModel model) const { LiteRtDestroyModel(model); }
};
struct OptionsFree {
  void operator()(LiteRtOptions options) const { LiteRtDestroyOptions(options); }
};
struct CompiledModelFree {
  void operator()(LiteRtCompiledModel compiled) const { LiteRtDestroyCompiledModel(compiled); }
};
struct TensorBufferFree {
  void operator()(LiteRtTensorBuffer buffer) const { LiteRtDestroyTensorBuffer(buffer); }
};
using EnvironmentPtr = std::unique_ptr<std::remove_pointer_t<LiteRtEnvironment>, EnvironmentFree>;
using ModelPtr = std::unique_ptr<std::remove_pointer_t<LiteRtModel>, ModelFree>;
using OptionsPtr = std::unique_ptr<std::remove_pointer_t<LiteRtOptions>, OptionsFree>;
using CompiledModelPtr = std::unique_ptr<std::remove_pointer_t<LiteRtCompiledModel>, CompiledModelFree>;
using TensorBufferPtr = std::unique_ptr<std::remove_pointer_t<LiteRtTensorBuffer>, TensorBufferFree>;

/// A 64-byte-aligned scratch buffer.
struct AlignedBuffer {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> data;

  explicit AlignedBuffer(size_t bytes)
      : data(std::aligned_alloc(kHostAlignment, (bytes / kHostAlignment + 1) * kHostAlignment)) {
    if (!data) throw std::bad_alloc();
  }
};

/// The compilation options: CPU accelerator only, its thread count and kernels.
OptionsPtr options_make(const BackendSettings& settings) {
  LiteRtOptions raw = nullptr;
  status_check(LiteRtCreateOptions(&raw), "LiteRT could not create compilation options");
  OptionsPtr options(raw);
  status_check(LiteRtSetOptionsHardwareAccelerators(options.get(), kLiteRtHwAcceleratorCpu),
               "LiteRT refused the CPU accelerator");
  // The CPU accelerator reads its options as TOML under the "xnnpack" identifier; the builders
  // (LrtCreateCpuOptions, litert/c/options/litert_cpu_options.cc) are client-side code that
  // libLiteRt.so does not export, so the same text is written here.
  std::string toml;
  if (settings.threads > 0) toml += "num_threads = " + std::to_string(settings.threads) + "\n";
  const std::string delegate = option_string(settings.options, "delegate", "xnnpack");
  if (delegate == "none") {
    toml += "kernel_mode = \"builtin\"\n";  // LiteRT's own optimized kernels instead of XNNPACK
  } else if (delegate != "xnnpack") {
    throw std::runtime_error("manifest.json: backend.options.delegate is '" + delegate +
                             "', not xnnpack or none; rebuild the artifact");
  }
  const std::string precision = option_string(settings.options, "inference_precision", "fp32");
  if (precision == "fp16") {
    if (delegate != "xnnpack") {
      throw std::runtime_error("manifest.json: an fp16 LiteRT artifact needs backend.options.delegate xnnpack "
                               "(LiteRT's builtin kernels compute in f32); rebuild the artifact");
    }
    // XNNPACK computes the FP32 operators in fp16 (TFLITE_XNNPACK_DELEGATE_FLAG_FORCE_FP16). A
    // `flags` entry replaces XNNPACK's default bits, so those are kept: QS8, QU8 and dynamic
    // fully-connected (tflite/delegates/xnnpack/xnnpack_delegate.h).
    toml += "flags = " + std::to_string(kXnnpackDefaultFlags | kXnnpackForceFp16) + "\n";
  } else if (precision != "fp32") {
    throw std::runtime_error("manifest.json: backend.options.inference_precision is '" + precision +
                             "', not fp32 or fp16; rebuild the artifact");
  }
  char* payload = new char[toml.size() + 1];
  std::memcpy(payload, toml.c_str(), toml.size() + 1);
  LiteRtOpaqueOptions cpu = nullptr;
  const LiteRtStatus made = LiteRtCreateOpaqueOptions(
      kCpuOptionsIdentifier, payload, [](void* p) { delete[] static_cast<char*>(p); }, &cpu);
  if (made != kLiteRtStatusOk) {
    delete[] payload;
    status_check(made, "LiteRT could not create the CPU accelerator's options");
  }
  const LiteRtStatus added = LiteRtAddOpaqueOptions(options.get(), cpu);  // takes ownership on success
  if (added != kLiteRtStatusOk) {
    LiteRtDestroyOpaqueOptions(cpu);
    status_check(added, "LiteRT refused the CPU accelerator's options");
  }
  return options;
}

/// Check that `path` is a whole TFLite flatbuffer; throws a one-sentence std::runtime_error if not.
void flatbuffer_verify(const std::string& path, const std::string& entry) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("LiteRT could not read " + entry + ": " + std::strerror(errno));
  struct stat info {};
  if (::fstat(fd, &info) != 0 || info.st_size < 8) {
    ::close(fd);
    throw std::runtime_error("LiteRT could not read " + entry + ": it is too short to be a TFLite flatbuffer");
  }
  const size_t size = static_cast<size_t>(info.st_size);
  void* data = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (data == MAP_FAILED) throw std::runtime_error("LiteRT could not map " + entry + ": " + std::strerror(errno));
  const auto* bytes = static_cast<const uint8_t*>(data);
  const bool identified = tflite::ModelBufferHasIdentifier(bytes);
  flatbuffers::Verifier verifier(bytes, size);
  const bool valid = identified && tflite::VerifyModelBuffer(verifier);
  ::munmap(data, size);
  if (!identified) {
    throw std::runtime_error("LiteRT could not read " + entry + ": it is not a TFLite flatbuffer (no TFL3 identifier)");
  }
  if (!valid) {
    throw std::runtime_error("LiteRT could not read " + entry +
                             ": the flatbuffer is truncated or corrupt (it fails TFLite's schema verifier)");
  }
}

/// Why a compiled model could not be made: the custom ops the model uses, if any (LiteRT has
/// kernels for builtin ops only), else the status.
std::string compile_failure(LiteRtModel model, LiteRtStatus status, const std::string& entry) {
  std::vector<std::string> custom;
  LiteRtParamIndex subgraphs = 0;
  if (LiteRtGetNumModelSubgraphs(model, &subgraphs) == kLiteRtStatusOk) {
    for (LiteRtParamIndex s = 0; s < subgraphs; ++s) {
      LiteRtSubgraph subgraph = nullptr;
      LiteRtParamIndex ops = 0;
      if (LiteRtGetModelSubgraph(model, s, &subgraph) != kLiteRtStatusOk ||
          LiteRtGetNumSubgraphOps(subgraph, &ops) != kLiteRtStatusOk) {
        continue;
      }
      for (LiteRtParamIndex o = 0; o < ops; ++o) {
        LiteRtOp op = nullptr;
        LiteRtOpCode code = kLiteRtOpCodeTflAdd;
        const char* name = nullptr;
        if (LiteRtGetSubgraphOp(subgraph, o, &op) == kLiteRtStatusOk &&
            LiteRtGetOpCode(op, &code) == kLiteRtStatusOk && code == kLiteRtOpCodeTflCustom &&
            LiteRtGetCustomCode(op, &name) == kLiteRtStatusOk && name != nullptr &&
            std::find(custom.begin(), custom.end(), name) == custom.end()) {
          custom.emplace_back(name);
        }
      }
    }
  }
  if (!custom.empty()) {
    std::string names;
    for (const std::string& name : custom) names += (names.empty() ? "" : ", ") + name;
    return "LiteRT cannot run " + entry + ": it uses the custom op" + (custom.size() > 1 ? "s " : " ") +
           names + ", which LiteRT has no kernel for; rebuild the artifact from a model without custom ops";
  }
  return "LiteRT could not prepare " + entry + " for the CPU (" + status_name(status) +
         "): an operator has no CPU kernel or the flatbuffer is malformed (LiteRT's log on stderr names it)";
}

/// How one manifest input or output meets the model's tensor.
struct Port {
  std::string name;                   ///< signature name in the model
  DType dtype = DTYPE_FLOAT32;        ///< the manifest's dtype (what the caller passes or gets)
  std::vector<int64_t> shape;         ///< the manifest's shape
  LiteRtRankedTensorType type{};      ///< the model's tensor type
  size_t bytes = 0;                   ///< size of the model's tensor
  bool quantized = false;             ///< float at the edge, integer in the model
  float scale = 1.0f;
  int64_t zero_point = 0;
};

/// The model's signature names in the manifest's order: backend.options.<key> as the toolchain
/// recorded it (litert-torch names inputs args_0.. and outputs output_0..), else the manifest's
/// names when the model has them all, else the model's order.
std::vector<std::string> names_in_manifest_order(const std::vector<ManifestTensor>& manifest,
                                                 const std::vector<std::string>& model,
                                                 const nlohmann::json& options, const char* key,
                                                 const char* what, const std::string& entry) {
  if (manifest.size() != model.size()) {
    throw std::runtime_error(entry + " has " + std::to_string(model.size()) + " " + what +
                             "(s), the manifest lists " + std::to_string(manifest.size()));
  }
  const auto recorded = options.find(key);
  if (recorded != options.end() && recorded->is_array() && recorded->size() == manifest.size()) {
    std::vector<std::string> names;
    for (const auto& name : *recorded) {
      if (!name.is_string() || std::find(model.begin(), model.end(), name.get<std::string>()) == model.end()) {
        throw std::runtime_error("manifest.json: backend.options." + std::string(key) + " names " +
                                 name.dump() + ", which " + entry + "'s signature lacks; rebuild the artifact");
      }
      names.push_back(name.get<std::string>());
    }
    return names;
  }
  std::vector<std::string> names;
  for (const ManifestTensor& tensor : manifest) {
    if (std::find(model.begin(), model.end(), tensor.name) == model.end()) return model;
    names.push_back(tensor.name);
  }
  return names;
}

/// The port of one manifest tensor: checks that the model's tensor has its shape and either its
/// dtype or, for a float32 manifest tensor, an int8/uint8 type with one scale (INT8 flatbuffer).
Port port_make(const ManifestTensor& manifest, const std::string& name, LiteRtTensor tensor,
               const char* what, const std::string& entry) {
  Port port;
  port.name = name;
  port.dtype = dtype_from_name(manifest.dtype);
  port.shape = manifest.shape;
  LiteRtTensorTypeId type_id = kLiteRtUnrankedTensorType;
  status_check(LiteRtGetTensorTypeId(tensor, &type_id), "LiteRT could not read the type of " + name);
  if (type_id != kLiteRtRankedTensorType) {
    throw std::runtime_error(std::string(what) + " " + name + " of " + entry + " has no fixed rank");
  }
  status_check(LiteRtGetRankedTensorType(tensor, &port.type), "LiteRT could not read the type of " + name);
  std::vector<int64_t> dims;
  for (unsigned i = 0; i < port.type.layout.rank; ++i) dims.push_back(port.type.layout.dimensions[i]);
  if (dims != manifest.shape) {
    std::string text;
    for (int64_t d : dims) text += (text.empty() ? "" : ", ") + std::to_string(d);
    std::string want;
    for (int64_t d : manifest.shape) want += (want.empty() ? "" : ", ") + std::to_string(d);
    throw std::runtime_error(std::string(what) + " " + name + " of " + entry + " has shape (" + text +
                             "), the manifest says " + manifest.name + " is (" + want + ")");
  }
  LiteRtElementType expected = kLiteRtElementTypeNone;
  if (!dtype_to_litert(port.dtype, &expected)) {
    throw std::runtime_error(std::string(what) + " " + manifest.name + " has a dtype LiteRT cannot take");
  }
  const LiteRtElementType actual = port.type.element_type;
  const size_t numel = static_cast<size_t>(shape_numel(port.shape));
  if (actual == expected) {
    port.bytes = numel * dtype_size(port.dtype);
    return port;
  }
  LiteRtQuantizationTypeId quantization = kLiteRtQuantizationNone;
  const bool integer = actual == kLiteRtElementTypeInt8 || actual == kLiteRtElementTypeUInt8;
  if (port.dtype == DTYPE_FLOAT32 && integer &&
      LiteRtGetQuantizationTypeId(tensor, &quantization) == kLiteRtStatusOk &&
      quantization == kLiteRtQuantizationPerTensor) {
    LiteRtQuantizationPerTensor params{};
    status_check(LiteRtGetPerTensorQuantization(tensor, &params),
                 "LiteRT could not read the quantization of " + name);
    port.quantized = true;
    port.scale = params.scale;
    port.zero_point = params.zero_point;
    port.bytes = numel;  // one byte per element
    return port;
  }
  throw std::runtime_error(std::string(what) + " " + name + " of " + entry + " is " + element_type_name(actual) +
                           ", the manifest says " + manifest.name + " is " + manifest.dtype);
}

/// float32 → int8/uint8 with the port's scale and zero point (round half to even, as NumPy).
void quantize(const Port& port, const float* in, void* out, size_t n) {
  const bool is_signed = port.type.element_type == kLiteRtElementTypeInt8;
  const double lo = is_signed ? -128.0 : 0.0, hi = is_signed ? 127.0 : 255.0;
  for (size_t i = 0; i < n; ++i) {
    const double q = std::clamp(std::nearbyint(in[i] / port.scale) + static_cast<double>(port.zero_point), lo, hi);
    if (is_signed) {
      static_cast<int8_t*>(out)[i] = static_cast<int8_t>(q);
    } else {
      static_cast<uint8_t*>(out)[i] = static_cast<uint8_t>(q);
    }
  }
}

/// int8/uint8 → float32 with the port's scale and zero point.
void dequantize(const Port& port, const void* in, float* out, size_t n) {
  const bool is_signed = port.type.element_type == kLiteRtElementTypeInt8;
  for (size_t i = 0; i < n; ++i) {
    const int64_t q = is_signed ? static_cast<const int8_t*>(in)[i] : static_cast<const uint8_t*>(in)[i];
    out[i] = static_cast<float>(q - port.zero_point) * port.scale;
  }
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kHostAlignment == 0; }

/// One compiled model (one interpreter, one XNNPACK thread pool) and its staging buffers.
struct Instance {
  CompiledModelPtr compiled;
  std::vector<std::unique_ptr<AlignedBuffer>> input_staging;   // made on first need
  std::vector<std::unique_ptr<AlignedBuffer>> output_staging;  // quantized outputs only
};

/// At most this many compiled models: max_concurrency, else one (callers share its thread pool).
size_t instance_limit(const BackendOpenArgs& args) {
  return args.max_concurrency > 0 ? static_cast<size_t>(args.max_concurrency) : 1;
}

class LiteRtBackend final : public Backend {
 public:
  LiteRtBackend(const BackendOpenArgs& args, const BackendSettings& settings, EnvironmentPtr env, ModelPtr model)
      : manifest_(args.manifest), env_(std::move(env)), model_(std::move(model)),
        options_(options_make(settings)),
        xnnpack_(option_string(settings.options, "delegate", "xnnpack") == "xnnpack"),
        fp16_(option_string(settings.options, "inference_precision", "fp32") == "fp16"),
        instances_([this] { return instance_make(); }, instance_limit(args)) {
    const std::string& entry = manifest_.payload.entry;
    signature_index_ = signature_find(option_string(settings.options, "signature", ""));
    LiteRtSignature signature = nullptr;
    status_check(LiteRtGetModelSignature(model_.get(), signature_index_, &signature),
                 "LiteRT could not read the signature of " + entry);
    ports_make(signature, settings.options, /*inputs=*/true, &inputs_);
    ports_make(signature, settings.options, /*inputs=*/false, &outputs_);
    // One compiled model now, run once: ops LiteRT cannot run are a load failure, not a run failure.
    instances_.pool_reserve(1);
    warm_up();
  }

  ~LiteRtBackend() override = default;

  BackendStatus backend_run(const std::vector<TensorView>& inputs,
                            std::vector<Tensor>* outputs) noexcept override {
    try {
      BackendStatus status = backend_inputs_check(manifest_, inputs);
      if (!status.ok()) return status;
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (inputs[i].dtype != inputs_[i].dtype || inputs[i].shape != inputs_[i].shape) {
          return backend_status_make(BACKEND_STATUS_INVALID, "input " + manifest_.inputs[i].name +
                                                                 " does not have the manifest's dtype and shape");
        }
      }
      InstanceLease<Instance> instance(instances_);
      try {
        return instance_run(*instance, inputs, outputs);
      } catch (...) {
        instance.lease_discard();
        throw;
      }
    } catch (const std::exception& e) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED, "LiteRT failed to run the model: " + message_first_line(e.what()));
    } catch (...) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED, "LiteRT failed to run the model");
    }
  }

  std::string backend_describe() const override {
    return std::string("litert " EDGESMITH_LITERT_VERSION " (CPU, ") + (xnnpack_ ? (fp16_ ? "XNNPACK fp16)" : "XNNPACK)") : "builtin kernels)");
  }

 private:
  /// Index of the signature named `key`, else of the only one.
  LiteRtParamIndex signature_find(const std::string& key) const {
    const std::string& entry = manifest_.payload.entry;
    LiteRtParamIndex count = 0;
    status_check(LiteRtGetNumModelSignatures(model_.get(), &count), "LiteRT could not list the signatures of " + entry);
    if (count == 0) throw std::runtime_error(entry + " has no signature; rebuild the artifact with litert-torch");
    for (LiteRtParamIndex i = 0; i < count; ++i) {
      LiteRtSignature signature = nullptr;
      const char* name = nullptr;
      if (LiteRtGetModelSignature(model_.get(), i, &signature) == kLiteRtStatusOk &&
          LiteRtGetSignatureKey(signature, &name) == kLiteRtStatusOk && name != nullptr && key == name) {
        return i;
      }
    }
    if (count == 1) return 0;
    throw std::runtime_error(entry + " has " + std::to_string(count) + " signatures and none is named '" + key + "'");
  }

  void ports_make(LiteRtSignature signature, const nlohmann::json& options, bool inputs, std::vector<Port>* ports) {
    const std::string& entry = manifest_.payload.entry;
    LiteRtParamIndex count = 0;
    status_check(inputs ? LiteRtGetNumSignatureInputs(signature, &count) : LiteRtGetNumSignatureOutputs(signature, &count),
                 "LiteRT could not read the signature of " + entry);
    std::vector<std::string> model_names;
    for (LiteRtParamIndex i = 0; i < count; ++i) {
      const char* name = nullptr;
      status_check(inputs ? LiteRtGetSignatureInputName(signature, i, &name) : LiteRtGetSignatureOutputName(signature, i, &name),
                   "LiteRT could not read the signature of " + entry);
      model_names.emplace_back(name != nullptr ? name : "");
    }
    const std::vector<ManifestTensor>& manifest = inputs ? manifest_.inputs : manifest_.outputs;
    const std::vector<std::string> names = names_in_manifest_order(
        manifest, model_names, options, inputs ? "input_names" : "output_names", inputs ? "input" : "output", entry);
    for (size_t i = 0; i < manifest.size(); ++i) {
      LiteRtTensor tensor = nullptr;
      status_check(inputs ? LiteRtGetSignatureInputTensor(signature, names[i].c_str(), &tensor)
                          : LiteRtGetSignatureOutputTensor(signature, names[i].c_str(), &tensor),
                   "LiteRT could not find " + names[i] + " in " + entry);
      // The order of the model's signature is what LiteRtRunCompiledModel takes buffers in.
      const size_t position = static_cast<size_t>(
          std::find(model_names.begin(), model_names.end(), names[i]) - model_names.begin());
      Port port = port_make(manifest[i], names[i], tensor, inputs ? "input" : "output", entry);
      ports->push_back(std::move(port));
      (inputs ? input_positions_ : output_positions_).push_back(position);
    }
  }

  /// Run the first compiled model on zeros; throws a one-sentence error naming the model's custom
  /// ops (if any) when LiteRT cannot run it.
  void warm_up() {
    std::vector<std::unique_ptr<AlignedBuffer>> zeros;
    std::vector<TensorView> views;
    for (const Port& port : inputs_) {
      const size_t bytes = static_cast<size_t>(shape_numel(port.shape)) * dtype_size(port.dtype);
      zeros.push_back(std::make_unique<AlignedBuffer>(bytes));
      std::memset(zeros.back()->data.get(), 0, bytes);
      views.push_back(TensorView{zeros.back()->data.get(), port.dtype, port.shape});
    }
    InstanceLease<Instance> instance(instances_);
    std::vector<Tensor> outputs;
    try {
      instance_run(*instance, views, &outputs);
    } catch (const std::exception&) {
      instance.lease_discard();
      throw std::runtime_error(compile_failure(model_.get(), kLiteRtStatusErrorRuntimeFailure, manifest_.payload.entry));
    }
  }

  std::unique_ptr<Instance> instance_make() {
    auto instance = std::make_unique<Instance>();
    LiteRtCompiledModel compiled = nullptr;
    LiteRtStatus status;
    {
      std::lock_guard<std::mutex> lock(compile_mutex_);
      status = LiteRtCreateCompiledModel(env_.get(), model_.get(), options_.get(), &compiled);
    }
    if (status != kLiteRtStatusOk) {
      throw std::runtime_error(compile_failure(model_.get(), status, manifest_.payload.entry));
    }
    instance->compiled.reset(compiled);
    instance->input_staging.resize(inputs_.size());
    for (const Port& port : outputs_) {
      instance->output_staging.push_back(port.quantized ? std::make_unique<AlignedBuffer>(port.bytes) : nullptr);
    }
    return instance;
  }

  static TensorBufferPtr buffer_wrap(const Port& port, void* data) {
    LiteRtTensorBuffer buffer = nullptr;
    status_check(LiteRtCreateTensorBufferFromHostMemory(&port.type, data, port.bytes, nullptr, &buffer),
                 "LiteRT could not wrap the buffer of " + port.name);
    return TensorBufferPtr(buffer);
  }

  BackendStatus instance_run(Instance& instance, const std::vector<TensorView>& inputs,
                             std::vector<Tensor>* outputs) const {
    std::vector<TensorBufferPtr> owned;
    std::vector<LiteRtTensorBuffer> input_buffers(inputs_.size()), output_buffers(outputs_.size());
    for (size_t i = 0; i < inputs_.size(); ++i) {
      const Port& port = inputs_[i];
      // LiteRT locks inputs for reading only: wrapping the caller's const memory is safe.
      void* data = const_cast<void*>(inputs[i].data);
      if (port.quantized || !aligned(data)) {
        if (!instance.input_staging[i]) instance.input_staging[i] = std::make_unique<AlignedBuffer>(port.bytes);
        void* staging = instance.input_staging[i]->data.get();
        const size_t numel = static_cast<size_t>(shape_numel(port.shape));
        if (port.quantized) {
          quantize(port, static_cast<const float*>(inputs[i].data), staging, numel);
        } else {
          std::memcpy(staging, inputs[i].data, port.bytes);
        }
        data = staging;
      }
      owned.push_back(buffer_wrap(port, data));
      input_buffers[input_positions_[i]] = owned.back().get();
    }
    std::vector<Tensor> results;
    results.reserve(outputs_.size());
    for (size_t i = 0; i < outputs_.size(); ++i) {
      const Port& port = outputs_[i];
      results.emplace_back(port.dtype, port.shape);  // 64-byte aligned: LiteRT writes into it
      void* data = port.quantized ? instance.output_staging[i]->data.get() : results.back().data();
      owned.push_back(buffer_wrap(port, data));
      output_buffers[output_positions_[i]] = owned.back().get();
    }
    status_check(LiteRtRunCompiledModel(instance.compiled.get(), signature_index_, input_buffers.size(),
                                        input_buffers.data(), output_buffers.size(), output_buffers.data()),
                 "LiteRtRunCompiledModel failed");
    for (size_t i = 0; i < outputs_.size(); ++i) {
      if (outputs_[i].quantized) {
        dequantize(outputs_[i], instance.output_staging[i]->data.get(), static_cast<float*>(results[i].data()),
                   static_cast<size_t>(shape_numel(outputs_[i].shape)));
      }
    }
    for (Tensor& tensor : results) outputs->push_back(std::move(tensor));
    return {};
  }

  Manifest manifest_;
  // Destroyed in reverse order: compiled models (in instances_) before the model, options and
  // environment they were made from.
  EnvironmentPtr env_;
  ModelPtr model_;
  OptionsPtr options_;
  bool xnnpack_;  // XNNPACK (backend.options.delegate "xnnpack") or LiteRT's builtin kernels ("none")
  bool fp16_;     // XNNPACK computes in fp16 (backend.options.inference_precision "fp16")
  std::mutex compile_mutex_;
  LiteRtParamIndex signature_index_ = 0;
  std::vector<Port> inputs_;
  std::vector<Port> outputs_;
  std::vector<size_t> input_positions_;   // manifest input i → the signature's input position
  std::vector<size_t> output_positions_;  // manifest output i → the signature's output position
  InstancePool<Instance> instances_;
};

Backend* litert_backend_open(const BackendOpenArgs& args, BackendStatus* status) {
  if (args.manifest.payload.format != "tflite") {
    *status = backend_status_make(BACKEND_STATUS_INVALID,
                                  "the tflite backend runs tflite payloads, this artifact's is " +
                                      args.manifest.payload.format);
    return nullptr;
  }
  const std::string& entry = args.manifest.payload.entry;
  try {
    const BackendSettings settings = backend_settings_resolve(args);
    const std::string path = args.artifact_dir + "/" + entry;
    flatbuffer_verify(path, entry);
    LiteRtEnvironment env = nullptr;
    // The CPU accelerator only (no attempt to load the GPU one), and LiteRT's log (stderr) at
    // errors only: the level is process-wide in LiteRT, and errors (e.g. an op without a kernel)
    // still show.
    LiteRtEnvOption env_options[2] = {};
    env_options[0].tag = kLiteRtEnvOptionTagAutoRegisterAccelerators;
    env_options[0].value.type = kLiteRtAnyTypeInt;
    env_options[0].value.int_value = kLiteRtHwAcceleratorCpu;
    env_options[1].tag = kLiteRtEnvOptionTagMinLoggerSeverity;
    env_options[1].value.type = kLiteRtAnyTypeInt;
    env_options[1].value.int_value = kLiteRtLogSeverityError;
    status_check(LiteRtCreateEnvironment(2, env_options, &env), "LiteRT could not create its environment");
    EnvironmentPtr env_owned(env);
    LiteRtModel model = nullptr;
    const LiteRtStatus loaded = LiteRtCreateModelFromFile(env, path.c_str(), &model);
    if (loaded != kLiteRtStatusOk) {
      *status = backend_status_make(BACKEND_STATUS_LOAD_FAILED,
                                    "LiteRT could not read " + entry + ": it is not a valid TFLite flatbuffer (" +
                                        status_name(loaded) + ")");
      return nullptr;
    }
    return new LiteRtBackend(args, settings, std::move(env_owned), ModelPtr(model));
  } catch (const std::exception& e) {
    const std::string message = message_first_line(e.what());
    *status = backend_status_make(BACKEND_STATUS_LOAD_FAILED,
                                  message.rfind("LiteRT", 0) == 0 ? message : "LiteRT could not load " + entry + ": " + message);
  } catch (...) {
    *status = backend_status_make(BACKEND_STATUS_LOAD_FAILED, "LiteRT could not load " + entry);
  }
  return nullptr;
}

}  // namespace
}  // namespace backends
}  // namespace edgesmith

EDGESMITH_BACKEND_DEFINE(edgesmith::backends::litert_backend_open, "tflite")
