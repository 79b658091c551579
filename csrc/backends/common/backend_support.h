// What the backend plugins share: the Backend class and EDGESMITH_BACKEND_DEFINE (common/backend.h),
// settings read from the manifest, a pool of engine instances for concurrent callers, and the
// one-sentence form of an engine's exception.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/backend.h"

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

/// Check that `outputs` match the manifest's outputs in count, dtype and shape; returns an INVALID
/// status naming the first that does not.
BackendStatus backend_outputs_check(const Manifest& manifest, const std::vector<TensorSpan>& outputs);

/// backend_run() for a backend that implements backend_run_into(): allocates tensors with the
/// manifest's output dtypes and shapes, runs into them and appends them to `outputs`.
BackendStatus backend_run_allocated(Backend& backend, const Manifest& manifest,
                                    const std::vector<TensorView>& inputs,
                                    std::vector<Tensor>* outputs) noexcept;

/// Engine instances (VMs, infer requests) for concurrent callers, at most `limit` of them: a
/// caller takes an idle one, makes a new one while fewer than `limit` exist, or waits for one to
/// be given back. So N callers never make more than `limit` engine states (and thread pools)
/// however many threads call. The mutex is held only to take or return one, never while making.
template <typename T>
class InstancePool {
 public:
  using Factory = std::function<std::unique_ptr<T>()>;

  /// A pool of at most `limit` (>= 1) instances made with `factory`.
  InstancePool(Factory factory, size_t limit)
      : factory_(std::move(factory)), limit_(limit > 0 ? limit : 1) {}

  /// An idle instance, a new one, or (at the limit) the next one given back; throws what the
  /// factory throws.
  std::unique_ptr<T> pool_take() {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      idle_or_room_.wait(lock, [this] { return !idle_.empty() || created_ < limit_; });
      if (!idle_.empty()) {
        std::unique_ptr<T> instance = std::move(idle_.back());
        idle_.pop_back();
        return instance;
      }
      ++created_;  // reserve the slot, then make the instance without the lock
    }
    try {
      return factory_();
    } catch (...) {
      pool_forget();
      throw;
    }
  }

  /// Give an instance back for reuse.
  void pool_return(std::unique_ptr<T> instance) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle_.push_back(std::move(instance));
    }
    idle_or_room_.notify_one();
  }

  /// An instance was dropped (its state is unknown after a failure): make room for a new one.
  void pool_forget() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --created_;
    }
    idle_or_room_.notify_one();
  }

  /// Make instances until `count` (at most the limit) exist, so start-up failures surface at load.
  void pool_reserve(size_t count) {
    std::vector<std::unique_ptr<T>> made;
    while (pool_created() < std::min(count, limit_)) made.push_back(pool_take());
    for (auto& instance : made) pool_return(std::move(instance));
  }

  /// Number of instances that exist (idle or in use).
  size_t pool_created() {
    std::lock_guard<std::mutex> lock(mutex_);
    return created_;
  }

  /// The most instances this pool will make.
  size_t pool_limit() const noexcept { return limit_; }

 private:
  Factory factory_;
  const size_t limit_;
  std::mutex mutex_;
  std::condition_variable idle_or_room_;
  std::vector<std::unique_ptr<T>> idle_;
  size_t created_ = 0;
};

/// A thread of its own that runs calls handed to it one at a time, for engines whose worker pools
/// belong to the calling thread (TVM's parallel-for pool is thread-local): giving each engine
/// instance one CallThread bounds the pools by the instances, not by the callers' threads.
class CallThread {
 public:
  /// Start the thread; `on_start` runs first on it (e.g. sizing the engine's thread pool).
  explicit CallThread(std::function<void()> on_start = {})
      : on_start_(std::move(on_start)), thread_([this] { thread_loop(); }) {}
  ~CallThread() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }
  CallThread(const CallThread&) = delete;
  CallThread& operator=(const CallThread&) = delete;

  /// Run `task` on the thread and wait for it; what it throws is rethrown here. One caller at a
  /// time (the instance's lease guarantees it).
  void call_run(const std::function<void()>& task) {
    std::unique_lock<std::mutex> lock(mutex_);
    task_ = &task;
    done_ = false;
    error_ = nullptr;
    wake_.notify_all();
    wake_.wait(lock, [this] { return done_; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void thread_loop() {
    if (on_start_) {
      try {
        on_start_();
      } catch (...) {
        // Sizing failed: the engine falls back to its defaults; calls still run.
      }
    }
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return stopping_ || task_ != nullptr; });
      if (task_ == nullptr) return;
      const std::function<void()>* task = task_;
      lock.unlock();
      std::exception_ptr error;
      try {
        (*task)();
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      task_ = nullptr;
      error_ = error;
      done_ = true;
      wake_.notify_all();
    }
  }

  std::function<void()> on_start_;
  std::mutex mutex_;
  std::condition_variable wake_;
  const std::function<void()>* task_ = nullptr;
  std::exception_ptr error_;
  bool done_ = false;
  bool stopping_ = false;
  std::thread thread_;  // last: started after everything it uses is initialised
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
  void lease_discard() {
    instance_.reset();
    pool_.pool_forget();
  }

 private:
  InstancePool<T>& pool_;
  std::unique_ptr<T> instance_;
};

}  // namespace backends
}  // namespace edgesmith
