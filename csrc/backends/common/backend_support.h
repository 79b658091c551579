// What the backend plugins share: settings read from manifest.json, a pool of engine instances
// for concurrent callers, and the one-sentence form of an engine's exception.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/backend.h"

/// Defines the two symbols a plugin exports: `edgesmith_backend_open_v1`, forwarding to
/// `open_fn(const BackendOpenArgs&, BackendStatus*)` so that no exception leaves the plugin, and
/// `edgesmith_backend_formats_v1`, returning `formats` (the payload formats it runs, comma-separated).
#define EDGESMITH_BACKEND_DEFINE(open_fn, formats)                                              \
  extern "C" __attribute__((visibility("default"))) const char* edgesmith_backend_formats_v1() { \
    return formats;                                                                              \
  }                                                                                              \
  extern "C" __attribute__((visibility("default"))) edgesmith::Backend* edgesmith_backend_open_v1( \
      const edgesmith::BackendOpenArgs* args, edgesmith::BackendStatus* status) {              \
    if (args == nullptr || status == nullptr) return nullptr;                                   \
    try {                                                                                       \
      *status = edgesmith::BackendStatus{};                                                     \
      return open_fn(*args, status);                                                            \
    } catch (...) {                                                                             \
      return nullptr; /* only an allocation failure while filling `status` can get here */     \
    }                                                                                           \
  }

namespace edgesmith {
namespace backends {

/// The engine settings of an artifact, from its manifest.
struct BackendSettings {
  int32_t threads = 0;      ///< engine worker threads: args.threads, else target.threads, else 0
  nlohmann::json options;   ///< backend.options as the toolchain wrote them (an object)
};

/// Resolve the settings of `args`; throws std::runtime_error with a one-sentence message when
/// backend.options is not a JSON object.
BackendSettings backend_settings_resolve(const BackendOpenArgs& args);

/// First line of an exception message (engines append tracebacks), without trailing blanks.
std::string message_first_line(const std::string& text);

/// A status with a code and message.
BackendStatus backend_status_make(BackendStatusCode code, std::string message);

/// Check that `inputs` match the manifest's input count; returns an INVALID status otherwise.
BackendStatus backend_inputs_check(const Manifest& manifest, const std::vector<TensorView>& inputs);

/// Engine instances (VMs, infer requests) for concurrent callers: a caller takes an idle one or
/// makes a new one, and gives it back afterwards. The mutex is held only to take or return one.
template <typename T>
class InstancePool {
 public:
  using Factory = std::function<std::unique_ptr<T>()>;

  /// A pool that makes instances with `factory` (called without the pool's mutex held).
  explicit InstancePool(Factory factory) : factory_(std::move(factory)) {}

  /// An idle instance, or a new one; throws what the factory throws.
  std::unique_ptr<T> pool_take() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!idle_.empty()) {
        std::unique_ptr<T> instance = std::move(idle_.back());
        idle_.pop_back();
        return instance;
      }
    }
    return pool_make();
  }

  /// Give an instance back for reuse.
  void pool_return(std::unique_ptr<T> instance) {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.push_back(std::move(instance));
  }

  /// Make instances until `count` exist (for callers that announce their concurrency).
  void pool_reserve(size_t count) {
    while (pool_created() < count) pool_return(pool_make());
  }

  /// Number of instances made so far.
  size_t pool_created() {
    std::lock_guard<std::mutex> lock(mutex_);
    return created_;
  }

 private:
  std::unique_ptr<T> pool_make() {
    std::unique_ptr<T> instance = factory_();
    std::lock_guard<std::mutex> lock(mutex_);
    ++created_;
    return instance;
  }

  Factory factory_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<T>> idle_;
  size_t created_ = 0;
};

/// Borrows one instance of an InstancePool for a scope and returns it on exit.
template <typename T>
class InstanceLease {
 public:
  /// Take an instance from `pool` (throws what the pool's factory throws).
  explicit InstanceLease(InstancePool<T>& pool) : pool_(pool), instance_(pool.pool_take()) {}
  ~InstanceLease() {
    if (instance_) pool_.pool_return(std::move(instance_));
  }
  InstanceLease(const InstanceLease&) = delete;
  InstanceLease& operator=(const InstanceLease&) = delete;

  /// The borrowed instance.
  T& operator*() const { return *instance_; }
  T* operator->() const { return instance_.get(); }

  /// Drop the instance instead of returning it (its engine state is unknown after a failure).
  void lease_discard() { instance_.reset(); }

 private:
  InstancePool<T>& pool_;
  std::unique_ptr<T> instance_;
};

}  // namespace backends
}  // namespace edgesmith
