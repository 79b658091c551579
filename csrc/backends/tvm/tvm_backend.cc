// The TVM backend: runs a `tvm-relax-so` payload (model.so, made by `tvm.compile` +
// `export_library`) with the Relax virtual machine of libtvm_runtime.
//
// A Relax VM keeps per-call state (registers, its memory pool), so it serves one caller at a
// time. The plugin keeps a pool of VMs over the one loaded library: `vm_load_executable()` makes
// a fresh VM each time it is called, and a concurrent caller takes an idle VM or makes one.
//
// Threads: TVM's parallel-for pool belongs to the *calling* thread (one pool per caller thread,
// created on its first parallel launch, sized by TVM_NUM_THREADS or the core count — halved on
// x86). So a library with parallel loops never runs on its callers' threads: each VM has a
// CallThread of its own whose pool is sized once with `runtime.config_threadpool(-3, n, cpus)`
// (exactly n workers, checked with runtime.NumThreads), and the VM pool is bounded, so N callers
// share at most `max_concurrency` (default 1) pools of n workers instead of making N of them.
// A serial library (no parallel loops) never touches TVM's pool: its VMs run on the caller's
// thread, at most `max_concurrency` (default: the thread count) at once.
#include <dlfcn.h>
#include <dlpack/dlpack.h>
#include <elf.h>
#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include "common/backend_support.h"

namespace edgesmith {
namespace backends {
namespace {

namespace ffi = tvm::ffi;

#ifndef EDGESMITH_TVM_VERSION
#define EDGESMITH_TVM_VERSION "unknown"
#endif

constexpr size_t TVM_ALIGNMENT = 64;     // what TVM's kernels assume of a tensor's data
constexpr int VM_ALLOCATOR_POOLED = 2;   // relax VM allocator kinds: 1 naive, 2 pooled
constexpr int TVM_AFFINITY_SHARE_ALL_CORES = -3;  // ThreadGroup::kSpecifyThreadShareAllCore

/// Allocator for ffi::Tensor::FromNDAlloc: 64-byte aligned host memory.
struct AlignedHostAlloc {
  void AllocData(DLTensor* tensor) {
    const size_t bytes = ffi::GetDataSize(*tensor);
    tensor->data = std::aligned_alloc(TVM_ALIGNMENT, (bytes / TVM_ALIGNMENT + 1) * TVM_ALIGNMENT);
    if (tensor->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

bool dtype_to_dl(DType dtype, DLDataType* out) {
  switch (dtype) {
    case DTYPE_BOOL: *out = {kDLBool, 8, 1}; return true;
    case DTYPE_INT8: *out = {kDLInt, 8, 1}; return true;
    case DTYPE_INT16: *out = {kDLInt, 16, 1}; return true;
    case DTYPE_INT32: *out = {kDLInt, 32, 1}; return true;
    case DTYPE_INT64: *out = {kDLInt, 64, 1}; return true;
    case DTYPE_UINT8: *out = {kDLUInt, 8, 1}; return true;
    case DTYPE_UINT16: *out = {kDLUInt, 16, 1}; return true;
    case DTYPE_UINT32: *out = {kDLUInt, 32, 1}; return true;
    case DTYPE_UINT64: *out = {kDLUInt, 64, 1}; return true;
    case DTYPE_FLOAT16: *out = {kDLFloat, 16, 1}; return true;
    case DTYPE_FLOAT32: *out = {kDLFloat, 32, 1}; return true;
    case DTYPE_FLOAT64: *out = {kDLFloat, 64, 1}; return true;
  }
  return false;
}

bool dtype_equal(DLDataType a, DLDataType b) {
  // TVM marks booleans as kDLUInt 1/8-bit in some paths; compare the storage width then.
  if ((a.code == kDLBool || (a.code == kDLUInt && a.bits == 1)) &&
      (b.code == kDLBool || (b.code == kDLUInt && b.bits == 1))) {
    return true;
  }
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}

/// `count` CPU ids for runtime.config_threadpool: the CPUs this process may run on, repeated
/// when more threads than CPUs are asked for.
ffi::Array<ffi::String> cpu_list_make(int32_t count) {
  std::vector<int> allowed;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (CPU_ISSET(cpu, &set)) allowed.push_back(cpu);
    }
  }
  if (allowed.empty()) allowed.push_back(0);
  ffi::Array<ffi::String> cpus;
  for (int32_t i = 0; i < count; ++i) {
    cpus.push_back(ffi::String(std::to_string(allowed[static_cast<size_t>(i) % allowed.size()])));
  }
  return cpus;
}

#if defined(__x86_64__)
constexpr uint16_t HOST_ELF_MACHINE = EM_X86_64;
#elif defined(__aarch64__)
constexpr uint16_t HOST_ELF_MACHINE = EM_AARCH64;
#else
constexpr uint16_t HOST_ELF_MACHINE = EM_NONE;
#endif

const char* elf_machine_name(uint16_t machine) {
  switch (machine) {
    case EM_X86_64: return "x86_64";
    case EM_AARCH64: return "aarch64";
    case EM_ARM: return "arm";
    case EM_RISCV: return "riscv";
    default: return "another ISA's";
  }
}

/// Why `path` cannot be dlopen()ed here, or empty: an ELF file for another machine (dlopen only
/// says "No such file" then), or one shorter than its own headers say (dlopen would map pages past
/// the end of the file and die of SIGBUS on touching them).
std::string elf_problem(const std::string& path, const std::string& entry) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) return {};
  const auto size = static_cast<uint64_t>(file.tellg());
  Elf64_Ehdr header{};
  file.seekg(0);
  if (!file.read(reinterpret_cast<char*>(&header), sizeof(header))) return {};
  if (std::memcmp(header.e_ident, ELFMAG, SELFMAG) != 0) return {};
  if (header.e_ident[EI_CLASS] != ELFCLASS64 || header.e_ident[EI_DATA] != ELFDATA2LSB) return {};
  if (HOST_ELF_MACHINE != EM_NONE && header.e_machine != HOST_ELF_MACHINE) {
    return entry + " is " + elf_machine_name(header.e_machine) + " code and this machine runs " +
           elf_machine_name(HOST_ELF_MACHINE) + "; run it on its own ISA (or under qemu)";
  }
  uint64_t needed = header.e_shoff + uint64_t{header.e_shnum} * header.e_shentsize;
  for (uint16_t i = 0; i < header.e_phnum; ++i) {
    Elf64_Phdr segment{};
    file.seekg(static_cast<std::streamoff>(header.e_phoff + uint64_t{i} * header.e_phentsize));
    if (!file.read(reinterpret_cast<char*>(&segment), sizeof(segment))) {
      needed = std::max<uint64_t>(needed, header.e_phoff + uint64_t{header.e_phnum} * header.e_phentsize);
      break;
    }
    if (segment.p_type == PT_LOAD) needed = std::max<uint64_t>(needed, segment.p_offset + segment.p_filesz);
  }
  if (needed > size) {
    return entry + " is truncated (" + std::to_string(size) + " bytes, its ELF headers need " +
           std::to_string(needed) + "); rebuild or re-download the artifact";
  }
  return {};
}

/// Whether the loaded library has parallel loops (it then imports TVM's parallel launcher).
/// Serial libraries never touch TVM's thread pool, so the plugin leaves it uncreated: no idle
/// workers per caller thread, and no pool start-up, which hangs under qemu-user.
bool library_is_parallel(const std::string& path) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) return true;  // cannot tell: configure the pool as asked
  const bool parallel = dlsym(handle, "__TVMBackendParallelLaunch") != nullptr;
  dlclose(handle);  // drops the reference RTLD_NOLOAD added
  return parallel;
}

/// The reason in a LoadFromFile error: TVM wraps dlerror() in "Check failed: ... Failed to load
/// dynamic shared library <path> <path>: <reason>".
std::string load_reason(const std::string& message) {
  if (message.find("Failed to load dynamic shared library") == std::string::npos) return message;
  const size_t colon = message.rfind(": ");
  return colon == std::string::npos ? message : message.substr(colon + 2);
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

/// One Relax VM over the shared library, with input tensors it owns, and the thread its calls run
/// on when the library has parallel loops (null: the caller's thread).
struct VmInstance {
  ffi::Module vm;
  ffi::Function main;
  std::vector<ffi::Tensor> inputs;
  std::unique_ptr<CallThread> thread;
};

/// How many VMs may exist: what the caller announced, else one per pool of `threads` workers
/// (one), or for a serial library one per thread the target grants.
size_t vm_limit(const BackendOpenArgs& args, int32_t threads, bool parallel) {
  if (args.max_concurrency > 0) return static_cast<size_t>(args.max_concurrency);
  if (parallel) return 1;
  return threads > 0 ? static_cast<size_t>(threads) : 1;
}

class TvmBackend final : public Backend {
 public:
  TvmBackend(const BackendOpenArgs& args, ffi::Module library, int32_t threads, bool parallel)
      : manifest_(args.manifest), library_(std::move(library)), threads_(threads),
        parallel_(parallel), cpu_list_(cpu_list_make(threads)),
        vms_([this] { return vm_make(); }, vm_limit(args, threads, parallel)) {
    for (const ManifestTensor& input : manifest_.inputs) {
      DLDataType dl{};
      if (!dtype_to_dl(dtype_from_name(input.dtype), &dl)) {
        throw std::runtime_error("input " + input.name + " has a dtype TVM cannot take");
      }
      input_dtypes_.push_back(dl);
    }
    for (const ManifestTensor& output : manifest_.outputs) {
      output_dtypes_.push_back(dtype_from_name(output.dtype));
    }
    // One VM now: a library that loads but cannot make a VM is a load failure, not a run failure.
    vms_.pool_reserve(1);
  }

  BackendStatus backend_run(const std::vector<TensorView>& inputs,
                            std::vector<Tensor>* outputs) noexcept override {
    return backend_run_allocated(*this, manifest_, inputs, outputs);
  }

  BackendStatus backend_run_into(const std::vector<TensorView>& inputs,
                                 const std::vector<TensorSpan>& outputs) noexcept override {
    try {
      BackendStatus status = backend_inputs_check(manifest_, inputs);
      if (status.ok()) status = backend_outputs_check(manifest_, outputs);
      if (!status.ok()) return status;
      InstanceLease<VmInstance> vm(vms_);
      try {
        if (vm->thread) {
          vm->thread->call_run([&] { status = vm_run(*vm, inputs, outputs); });
        } else {
          status = vm_run(*vm, inputs, outputs);
        }
      } catch (...) {
        vm.lease_discard();  // a VM that threw mid-call may hold half-written state
        throw;
      }
      return status;
    } catch (const ffi::Error& e) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED,
                                 "TVM failed to run the model: " + e.kind() + ": " +
                                     message_first_line(e.message()));
    } catch (const std::exception& e) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED,
                                 "TVM failed to run the model: " + message_first_line(e.what()));
    } catch (...) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED, "TVM failed to run the model");
    }
  }

  std::string backend_describe() const override { return "tvm " EDGESMITH_TVM_VERSION; }

 private:
  std::unique_ptr<VmInstance> vm_make() {
    // Making a VM touches the library module's state; one at a time.
    std::lock_guard<std::mutex> lock(make_mutex_);
    ffi::Optional<ffi::Function> load = library_->GetFunction("vm_load_executable", true);
    if (!load.has_value()) {
      throw std::runtime_error("model.so has no vm_load_executable function; it is not a Relax VM "
                               "library made by `edgesmith build --backend tvm`");
    }
    ffi::Module vm = (*load)().cast<ffi::Module>();
    ffi::Optional<ffi::Function> init = vm->GetFunction("vm_initialization", false);
    if (!init.has_value()) throw std::runtime_error("the TVM VM has no vm_initialization function");
    (*init)(static_cast<int>(kDLCPU), 0, VM_ALLOCATOR_POOLED, static_cast<int>(kDLCPU), 0,
            VM_ALLOCATOR_POOLED);
    ffi::Optional<ffi::Function> main = vm->GetFunction("main", false);
    if (!main.has_value()) throw std::runtime_error("model.so has no main function");
    auto instance = std::unique_ptr<VmInstance>(new VmInstance{vm, *main, {}, nullptr});
    if (parallel_) instance->thread = std::make_unique<CallThread>([this] { threads_apply(); });
    for (size_t i = 0; i < manifest_.inputs.size(); ++i) {
      const std::vector<int64_t>& shape = manifest_.inputs[i].shape;
      instance->inputs.push_back(ffi::Tensor::FromNDAlloc(
          AlignedHostAlloc(), ffi::Shape(shape.begin(), shape.end()), input_dtypes_[i],
          DLDevice{kDLCPU, 0}));
    }
    return instance;
  }

  /// Size the calling thread's TVM pool (run first on each VM's CallThread).
  void threads_apply() const {
    if (threads_ <= 0) return;
    // Leaked on purpose: libtvm_runtime may be gone when static destructors run.
    static const auto* config =
        new ffi::Optional<ffi::Function>(ffi::Function::GetGlobal("runtime.config_threadpool"));
    if (config->has_value()) {
      // With an explicit CPU list TVM sizes the pool by the list (before creating this thread's
      // pool); the plain form could only lower the count below TVM's default, which on x86 is half
      // the cores. All workers share all of the process's CPUs, as without pinning.
      (**config)(TVM_AFFINITY_SHARE_ALL_CORES, static_cast<int>(threads_), cpu_list_);
    }
  }

  BackendStatus vm_run(VmInstance& vm, const std::vector<TensorView>& inputs,
                       const std::vector<TensorSpan>& outputs) {
    std::vector<ffi::AnyView> views;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const ffi::Tensor& tensor = vm.inputs[i];
      const size_t bytes = ffi::GetDataSize(static_cast<size_t>(tensor.numel()), tensor.dtype());
      std::memcpy(tensor.data_ptr(), inputs[i].data, bytes);
      views.emplace_back(tensor);
    }
    ffi::Any result;
    vm.main.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);

    std::vector<ffi::Tensor> results;
    if (!results_collect(result, &results)) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED,
                                 "the model's main returned " + result.GetTypeKey() +
                                     ", not a tensor or a tuple of tensors");
    }
    if (results.size() != manifest_.outputs.size()) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED,
                                 "the model returned " + std::to_string(results.size()) +
                                     " output(s), the manifest lists " +
                                     std::to_string(manifest_.outputs.size()));
    }
    for (size_t i = 0; i < results.size(); ++i) {
      BackendStatus status = output_copy(i, results[i], outputs[i]);
      if (!status.ok()) return status;
    }
    return {};
  }

  static bool results_collect(const ffi::Any& value, std::vector<ffi::Tensor>* results) {
    if (std::optional<ffi::Tensor> tensor = value.as<ffi::Tensor>()) {
      results->push_back(*tensor);
      return true;
    }
    if (std::optional<ffi::Array<ffi::Any>> items = value.try_cast<ffi::Array<ffi::Any>>()) {
      for (const ffi::Any& item : *items) {
        if (!results_collect(item, results)) return false;
      }
      return true;
    }
    return false;
  }

  /// Copy output `index` out of the VM's tensor (the VM's memory pool reuses it) into the
  /// runtime's buffer.
  BackendStatus output_copy(size_t index, const ffi::Tensor& result, const TensorSpan& out) const {
    const ManifestTensor& expected = manifest_.outputs[index];
    const std::vector<int64_t> shape(result.shape().begin(), result.shape().end());
    DLDataType want{};
    dtype_to_dl(output_dtypes_[index], &want);
    if (shape != expected.shape || !dtype_equal(result.dtype(), want)) {
      return backend_status_make(
          BACKEND_STATUS_RUN_FAILED,
          "output " + expected.name + " came back as " +
              std::string(ffi::DLDataTypeToString(result.dtype())) + " " + shape_text(shape) +
              ", the manifest says " + expected.dtype + " " + shape_text(expected.shape));
    }
    if (result.device().device_type != kDLCPU || !result.IsContiguous()) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED,
                                 "output " + expected.name + " is not a contiguous CPU tensor");
    }
    const auto* source = static_cast<const uint8_t*>(result.data_ptr()) + result.byte_offset();
    std::memcpy(out.data, source, out.byte_size);
    return {};
  }

  Manifest manifest_;
  ffi::Module library_;
  int32_t threads_;
  bool parallel_;
  ffi::Array<ffi::String> cpu_list_;
  std::vector<DLDataType> input_dtypes_;
  std::vector<DType> output_dtypes_;
  std::mutex make_mutex_;
  InstancePool<VmInstance> vms_;
};

Backend* tvm_backend_open(const BackendOpenArgs& args, BackendStatus* status) {
  if (args.manifest.payload.format != "tvm-relax-so") {
    *status = backend_status_make(BACKEND_STATUS_INVALID,
                                  "the tvm backend runs tvm-relax-so payloads, this artifact's is " +
                                      args.manifest.payload.format);
    return nullptr;
  }
  const std::string path = args.artifact_dir + "/" + args.manifest.payload.entry;
  try {
    const BackendSettings settings = backend_settings_resolve(args);
    const std::string problem = elf_problem(path, args.manifest.payload.entry);
    if (!problem.empty()) {
      *status = backend_status_make(BACKEND_STATUS_LOAD_FAILED, problem);
      return nullptr;
    }
    ffi::Module library = ffi::Module::LoadFromFile(path);
    const bool parallel = library_is_parallel(path);
    return new TvmBackend(args, std::move(library), settings.threads, parallel);
  } catch (const ffi::Error& e) {
    *status = backend_status_make(BACKEND_STATUS_LOAD_FAILED,
                                  "TVM could not load " + args.manifest.payload.entry + ": " +
                                      message_first_line(load_reason(e.message())) +
                                      "; rebuild or re-download the artifact");
  } catch (const std::exception& e) {
    *status = backend_status_make(BACKEND_STATUS_LOAD_FAILED,
                                  "TVM could not load " + args.manifest.payload.entry + ": " +
                                      message_first_line(e.what()));
  } catch (...) {
    *status = backend_status_make(BACKEND_STATUS_LOAD_FAILED,
                                  "TVM could not load " + args.manifest.payload.entry);
  }
  return nullptr;
}

}  // namespace
}  // namespace backends
}  // namespace edgesmith

EDGESMITH_BACKEND_DEFINE(edgesmith::backends::tvm_backend_open, "tvm-relax-so")
