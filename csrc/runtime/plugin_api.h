/* The ABI of edgesmith backend plugins: a versioned C function table, as ONNX Runtime's
 * OrtGetApiBase()->GetApi(ORT_API_VERSION).
 *
 * A plugin (libedgesmith_backend_<name>.so) exports exactly one symbol, edgesmith_plugin_base().
 * The runtime calls it, asks the base for the table of the version it speaks with
 * get_api(EDGESMITH_PLUGIN_API_VERSION), and refuses the plugin, naming both versions, when the
 * answer is NULL. Everything that crosses the boundary is a fixed-width integer, a NUL-terminated
 * UTF-8 `const char*`, a plain struct of those, or an opaque handle: no C++ type, no exception, no
 * memory one side allocates and the other frees. So the layout of the runtime's C++ classes
 * (Manifest, Tensor, ...) can change without breaking a plugin; only a change to this file does,
 * and any such change bumps EDGESMITH_PLUGIN_API_VERSION.
 *
 * Memory: the caller owns everything it passes in, for the duration of the call. Outputs are
 * preallocated by the runtime with the manifest's dtypes and static shapes (64-byte aligned); the
 * plugin writes into them (ONNX Runtime binds them as its output buffers: no copy). A status is
 * allocated by the plugin and freed by the runtime with the same table's status_free.
 *
 * Threads: backend_run may be called from many threads at once on one backend; the other
 * functions are not called concurrently with anything on the same backend.
 *
 * Plugin authors writing C++ do not fill this table by hand: csrc/backends/common/backend.h adapts a
 * small C++ class to it (EDGESMITH_BACKEND_DEFINE). This header compiles as C99 and as C++. */
#ifndef EDGESMITH_RUNTIME_PLUGIN_API_H_
#define EDGESMITH_RUNTIME_PLUGIN_API_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The plugin ABI version this header describes. Version 1 was the C++ entry point
 *  edgesmith_backend_open_v1, which no runtime loads any more. */
#define EDGESMITH_PLUGIN_API_VERSION 2

/** Name of the one symbol a plugin exports (a function returning its EdgesmithPluginBase). */
#define EDGESMITH_PLUGIN_BASE_SYMBOL "edgesmith_plugin_base"

#if defined(__GNUC__) || defined(__clang__)
#define EDGESMITH_PLUGIN_EXPORT __attribute__((visibility("default")))
#else
#define EDGESMITH_PLUGIN_EXPORT
#endif

/** Outcome of a plugin call (EdgesmithStatus's code). The values are part of the ABI. */
typedef enum EdgesmithStatusCode {
  EDGESMITH_STATUS_CODE_OK = 0,
  EDGESMITH_STATUS_CODE_LOAD_FAILED = 1, /**< the payload could not be loaded (truncated, foreign) */
  EDGESMITH_STATUS_CODE_RUN_FAILED = 2,  /**< inference failed */
  EDGESMITH_STATUS_CODE_INVALID = 3      /**< the plugin was handed something it cannot run */
} EdgesmithStatusCode;

/** Element types of tensors (the manifest's NumPy dtype names). The values are part of the ABI. */
typedef enum EdgesmithDType {
  EDGESMITH_DTYPE_BOOL = 0,
  EDGESMITH_DTYPE_INT8 = 1,
  EDGESMITH_DTYPE_INT16 = 2,
  EDGESMITH_DTYPE_INT32 = 3,
  EDGESMITH_DTYPE_INT64 = 4,
  EDGESMITH_DTYPE_UINT8 = 5,
  EDGESMITH_DTYPE_UINT16 = 6,
  EDGESMITH_DTYPE_UINT32 = 7,
  EDGESMITH_DTYPE_UINT64 = 8,
  EDGESMITH_DTYPE_FLOAT16 = 9,
  EDGESMITH_DTYPE_FLOAT32 = 10,
  EDGESMITH_DTYPE_FLOAT64 = 11
} EdgesmithDType;

/** A plugin's error: a code and a one-sentence message. Opaque; made by the plugin, read with
 *  status_code / status_message and freed with status_free of the table that returned it.
 *  Functions returning EdgesmithStatus* return NULL on success. */
typedef struct EdgesmithStatus EdgesmithStatus;

/** One payload opened by a plugin. Opaque; made by backend_open, freed by backend_close. */
typedef struct EdgesmithBackend EdgesmithBackend;

/** An input or output of the model as the manifest declares it. */
typedef struct EdgesmithTensorSpec {
  const char* name;      /**< the manifest's tensor name */
  int32_t dtype;         /**< an EdgesmithDType */
  uint32_t rank;         /**< number of dimensions (0: a scalar) */
  const int64_t* shape;  /**< `rank` static dimensions */
} EdgesmithTensorSpec;

/** A C-contiguous input tensor, read-only for the plugin. */
typedef struct EdgesmithTensorView {
  const void* data;      /**< `byte_size` bytes */
  uint64_t byte_size;    /**< element count times the dtype's size */
  int32_t dtype;         /**< an EdgesmithDType */
  uint32_t rank;
  const int64_t* shape;
} EdgesmithTensorView;

/** A C-contiguous output buffer the runtime allocated (64-byte aligned) and the plugin fills. */
typedef struct EdgesmithTensorBuffer {
  void* data;            /**< `byte_size` writable bytes */
  uint64_t byte_size;
  int32_t dtype;         /**< an EdgesmithDType: the manifest's */
  uint32_t rank;
  const int64_t* shape;  /**< the manifest's static shape */
} EdgesmithTensorBuffer;

/** What a backend is opened with: the artifact, already verified, described in plain C. */
typedef struct EdgesmithOpenArgs {
  const char* artifact_dir;          /**< absolute path of the verified artifact directory */
  const char* model_name;            /**< manifest `name` (for messages) */
  const char* payload_format;        /**< manifest `payload.format`, e.g. "tvm-relax-so" */
  const char* payload_entry;         /**< manifest `payload.entry`, relative to artifact_dir */
  const char* backend_options_json;  /**< manifest `backend.options` as JSON text (an object) */
  const char* manifest_json;         /**< the whole verified manifest.json, for fields not above */
  int32_t threads;                   /**< engine worker threads (the caller's, else the target's); 0 = engine default */
  int32_t max_concurrency;           /**< concurrent backend_run callers to prepare for; 0 = as needed */
  uint32_t input_count;
  uint32_t output_count;
  const EdgesmithTensorSpec* inputs;   /**< `input_count` specs, in manifest order */
  const EdgesmithTensorSpec* outputs;  /**< `output_count` specs, in manifest order */
} EdgesmithOpenArgs;

/** The functions of one ABI version. Filled by the plugin; never written by the runtime. */
typedef struct EdgesmithPluginApi {
  uint32_t struct_size;  /**< sizeof(EdgesmithPluginApi) as the plugin was compiled */
  uint32_t api_version;  /**< EDGESMITH_PLUGIN_API_VERSION as the plugin was compiled */
  const char* formats;   /**< payload formats the plugin runs, comma-separated (static) */

  /** Open the payload described by `args`; on success stores a backend in `*backend` and
   *  returns NULL, otherwise leaves `*backend` NULL and returns a status. */
  EdgesmithStatus* (*backend_open)(const EdgesmithOpenArgs* args, EdgesmithBackend** backend);

  /** Run one inference: `inputs` in manifest order (their dtypes and shapes already checked
   *  against the manifest), `outputs` preallocated in manifest order. Thread-safe. */
  EdgesmithStatus* (*backend_run)(EdgesmithBackend* backend, const EdgesmithTensorView* inputs,
                                  uint32_t input_count, const EdgesmithTensorBuffer* outputs,
                                  uint32_t output_count);

  /** Engine name and version, e.g. "openvino 2026.4.1"; owned by the backend until backend_close. */
  const char* (*backend_describe)(const EdgesmithBackend* backend);

  /** Free a backend (NULL is ignored). No backend_run may be in progress. */
  void (*backend_close)(EdgesmithBackend* backend);

  /** The EdgesmithStatusCode of a status (EDGESMITH_STATUS_CODE_OK for NULL). */
  int32_t (*status_code)(const EdgesmithStatus* status);

  /** The one-sentence message of a status ("" for NULL); valid until status_free. */
  const char* (*status_message)(const EdgesmithStatus* status);

  /** Free a status (NULL is ignored). */
  void (*status_free)(EdgesmithStatus* status);
} EdgesmithPluginApi;

/** What edgesmith_plugin_base() returns. Its layout never changes across ABI versions. */
typedef struct EdgesmithPluginBase {
  uint32_t api_version_oldest;  /**< the oldest ABI version get_api answers */
  uint32_t api_version_newest;  /**< the newest ABI version get_api answers */
  /** The table of ABI `version`, or NULL when the plugin does not speak it. */
  const EdgesmithPluginApi* (*get_api)(uint32_t version);
} EdgesmithPluginBase;

/** Signature of edgesmith_plugin_base, the one symbol every plugin exports. */
typedef const EdgesmithPluginBase* (*EdgesmithPluginBaseFn)(void);

/** The plugin's entry point (defined by each plugin, looked up by the runtime with dlsym):
 *  a static base that outlives every call. */
EDGESMITH_PLUGIN_EXPORT const EdgesmithPluginBase* edgesmith_plugin_base(void);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* EDGESMITH_RUNTIME_PLUGIN_API_H_ */
