#include "telemetry/contract_check.h"

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <regex>
#include <set>
#include <vector>

#include "common/contract_words.h"

namespace edgesmith {

namespace c = contract;
using nlohmann::json;

namespace {

constexpr double MAX_MICROS = c::MAX_MICROS;

// Walks one message; the first problem found is kept.
class Checker {
 public:
  std::string problem;

  bool fail(const std::string& where, const std::string& what) {
    if (problem.empty()) problem = where + ": " + what;
    return false;
  }

  // An object with exactly these keys allowed (`required` among them); `open`: others are ignored.
  bool object(const json& v, const std::string& where, std::initializer_list<const char*> allowed,
              std::initializer_list<const char*> required, bool open = false) {
    if (!v.is_object()) return fail(where, "must be an object");
    for (const char* name : required) {
      if (!v.contains(name)) return fail(where, std::string("lacks '") + name + "'");
    }
    if (!open) {
      const std::set<std::string> known(allowed.begin(), allowed.end());
      for (const auto& item : v.items()) {
        if (known.count(item.key()) == 0) return fail(where, "has an unknown field '" + item.key() + "'");
      }
    }
    return true;
  }

  bool count(const json& v, const std::string& where, uint64_t max = c::MAX_SAFE_INT, uint64_t min = 0) {
    if (!v.is_number_integer()) return fail(where, "must be an integer");
    if (!v.is_number_unsigned() && v.get<int64_t>() < 0) return fail(where, "must not be negative");
    const uint64_t n = v.get<uint64_t>();
    if (n < min || n > max) return fail(where, "must be in [" + std::to_string(min) + ", " + std::to_string(max) + "]");
    return true;
  }

  bool number(const json& v, const std::string& where, double lo, double hi, bool lo_open = false) {
    if (!v.is_number()) return fail(where, "must be a number");
    const double d = v.get<double>();
    if (!std::isfinite(d) || d > hi || d < lo || (lo_open && d == lo)) return fail(where, "is out of range");
    return true;
  }

  // Characters, as pydantic counts them (code points of UTF-8 text).
  static size_t length(const std::string& s) {
    size_t n = 0;
    for (const unsigned char ch : s) n += (ch & 0xC0) != 0x80;
    return n;
  }

  bool text(const json& v, const std::string& where, size_t max, size_t min = 0) {
    if (!v.is_string()) return fail(where, "must be a string");
    const size_t n = length(v.get_ref<const std::string&>());
    if (n < min || n > max) return fail(where, "must hold " + std::to_string(min) + " to " + std::to_string(max) + " characters");
    return true;
  }

  bool matches(const json& v, const std::string& where, const std::regex& pattern) {
    if (!v.is_string() || !std::regex_match(v.get_ref<const std::string&>(), pattern)) {
      return fail(where, "does not match the contract's pattern");
    }
    return true;
  }

  bool word(const json& v, const std::string& where, std::initializer_list<const char*> words) {
    if (v.is_string()) {
      for (const char* w : words) {
        if (v.get_ref<const std::string&>() == w) return true;
      }
    }
    return fail(where, "is not one of the contract's words");
  }

  // A field that may be absent or null.
  static bool given(const json& parent, const char* name) { return parent.contains(name) && !parent[name].is_null(); }

  static std::string at(const std::string& where, const char* name) { return where + "." + name; }

  bool counts(const json& v, const std::string& where, size_t max_items, uint64_t max = c::MAX_SAFE_INT) {
    if (!v.is_array() || v.size() > max_items) return fail(where, "must be a list of at most " + std::to_string(max_items));
    for (size_t i = 0; i < v.size(); ++i) {
      if (!count(v[i], where + "[" + std::to_string(i) + "]", max)) return false;
    }
    return true;
  }
};

const std::regex& id_pattern() {
  static const std::regex pattern(c::ID_REGEX);
  return pattern;
}
const std::regex& sha_pattern() {
  static const std::regex pattern(c::SHA256_REGEX);
  return pattern;
}
const std::regex& epoch_pattern() {
  static const std::regex pattern(c::EPOCH_REGEX);
  return pattern;
}
const std::regex& slot_pattern() {
  static const std::regex pattern(c::SLOT_REGEX);
  return pattern;
}
const std::regex& event_pattern() {
  static const std::regex pattern(c::EVENT_REGEX);
  return pattern;
}

bool output_layout(Checker& k, const json& o, const std::string& where, std::set<std::string>& names) {
  if (!k.object(o, where, {c::F_OUTPUT_LAYOUT_NAME, c::F_OUTPUT_LAYOUT_KIND, c::F_OUTPUT_LAYOUT_CLASSES,
                           c::F_OUTPUT_LAYOUT_EDGES, c::F_OUTPUT_LAYOUT_REFERENCE},
                {c::F_OUTPUT_LAYOUT_NAME, c::F_OUTPUT_LAYOUT_KIND})) {
    return false;
  }
  if (!k.text(o[c::F_OUTPUT_LAYOUT_NAME], Checker::at(where, c::F_OUTPUT_LAYOUT_NAME), c::MAX_LABEL, 1) ||
      !k.word(o[c::F_OUTPUT_LAYOUT_KIND], Checker::at(where, c::F_OUTPUT_LAYOUT_KIND),
              {c::OUTPUT_KIND_CLASSES, c::OUTPUT_KIND_HISTOGRAM})) {
    return false;
  }
  if (!names.insert(o[c::F_OUTPUT_LAYOUT_NAME].get<std::string>()).second) return k.fail(where, "repeats an output name");
  const bool classes = o[c::F_OUTPUT_LAYOUT_KIND] == c::OUTPUT_KIND_CLASSES;
  uint64_t bins = 0;
  if (Checker::given(o, c::F_OUTPUT_LAYOUT_CLASSES) &&
      !k.count(o[c::F_OUTPUT_LAYOUT_CLASSES], Checker::at(where, c::F_OUTPUT_LAYOUT_CLASSES), c::MAX_CLASSES, 1)) {
    return false;
  }
  if (Checker::given(o, c::F_OUTPUT_LAYOUT_EDGES)) {
    const json& edges = o[c::F_OUTPUT_LAYOUT_EDGES];
    const std::string w = Checker::at(where, c::F_OUTPUT_LAYOUT_EDGES);
    if (!edges.is_array() || edges.size() < 2 || edges.size() > c::MAX_EDGES) {
      return k.fail(w, "must hold 2 to " + std::to_string(c::MAX_EDGES) + " edges");
    }
    for (size_t i = 0; i < edges.size(); ++i) {
      if (!k.number(edges[i], w, -MAX_MICROS, MAX_MICROS)) return false;
      if (i > 0 && edges[i].get<double>() <= edges[i - 1].get<double>()) return k.fail(w, "must be strictly ascending");
    }
  }
  if (classes) {
    if (!Checker::given(o, c::F_OUTPUT_LAYOUT_CLASSES)) return k.fail(where, "a 'classes' output needs 'classes'");
    bins = o[c::F_OUTPUT_LAYOUT_CLASSES].get<uint64_t>();
  } else {
    if (!Checker::given(o, c::F_OUTPUT_LAYOUT_EDGES)) return k.fail(where, "a 'histogram' output needs 'edges'");
    bins = o[c::F_OUTPUT_LAYOUT_EDGES].size() - 1 + 2;
  }
  if (Checker::given(o, c::F_OUTPUT_LAYOUT_REFERENCE)) {
    const json& ref = o[c::F_OUTPUT_LAYOUT_REFERENCE];
    const std::string w = Checker::at(where, c::F_OUTPUT_LAYOUT_REFERENCE);
    if (!ref.is_array() || ref.size() != bins) return k.fail(w, "must hold one share per bin");
    for (const json& share : ref) {
      if (!k.number(share, w, 0.0, 1.0)) return false;
    }
  }
  return true;
}

bool birth(Checker& k, const json& m) {
  if (!k.text(m[c::F_BIRTH_TARGET], c::F_BIRTH_TARGET, c::MAX_LABEL)) return false;
  const json& runtime = m[c::F_BIRTH_RUNTIME];
  if (!k.object(runtime, c::F_BIRTH_RUNTIME, {c::F_RUNTIME_VERSION, c::F_RUNTIME_ISA, c::F_RUNTIME_CPU},
                {c::F_RUNTIME_VERSION, c::F_RUNTIME_ISA}) ||
      !k.text(runtime[c::F_RUNTIME_VERSION], "runtime.version", c::MAX_LABEL) ||
      !k.text(runtime[c::F_RUNTIME_ISA], "runtime.isa", c::MAX_LABEL) ||
      (runtime.contains(c::F_RUNTIME_CPU) && !runtime[c::F_RUNTIME_CPU].is_null() &&
       !k.text(runtime[c::F_RUNTIME_CPU], "runtime.cpu", c::MAX_LABEL))) {
    return false;
  }
  const json& a = m[c::F_BIRTH_ARTIFACT];
  const auto labels = {c::F_ARTIFACT_REF_NAME, c::F_ARTIFACT_REF_MODEL, c::F_ARTIFACT_REF_MODEL_VERSION,
                       c::F_ARTIFACT_REF_TARGET, c::F_ARTIFACT_REF_BACKEND, c::F_ARTIFACT_REF_BACKEND_VERSION};
  if (!k.object(a, c::F_BIRTH_ARTIFACT,
                {c::F_ARTIFACT_REF_NAME, c::F_ARTIFACT_REF_MODEL, c::F_ARTIFACT_REF_MODEL_VERSION,
                 c::F_ARTIFACT_REF_TARGET, c::F_ARTIFACT_REF_BACKEND, c::F_ARTIFACT_REF_BACKEND_VERSION,
                 c::F_ARTIFACT_REF_MANIFEST_SHA256},
                {c::F_ARTIFACT_REF_NAME, c::F_ARTIFACT_REF_MODEL, c::F_ARTIFACT_REF_MODEL_VERSION,
                 c::F_ARTIFACT_REF_TARGET, c::F_ARTIFACT_REF_BACKEND, c::F_ARTIFACT_REF_BACKEND_VERSION,
                 c::F_ARTIFACT_REF_MANIFEST_SHA256})) {
    return false;
  }
  for (const char* name : labels) {
    if (!k.text(a[name], Checker::at("artifact", name), c::MAX_LABEL)) return false;
  }
  if (!k.matches(a[c::F_ARTIFACT_REF_MANIFEST_SHA256], "artifact.manifest_sha256", sha_pattern())) return false;
  const json& metrics = m[c::F_BIRTH_METRICS];
  if (!k.object(metrics, c::F_BIRTH_METRICS,
                {c::F_METRIC_SCHEMA_INTERVAL_S, c::F_METRIC_SCHEMA_LATENCY, c::F_METRIC_SCHEMA_OUTPUTS,
                 c::F_METRIC_SCHEMA_BUILD_LATENCY_US},
                {c::F_METRIC_SCHEMA_INTERVAL_S, c::F_METRIC_SCHEMA_LATENCY, c::F_METRIC_SCHEMA_OUTPUTS}) ||
      !k.number(metrics[c::F_METRIC_SCHEMA_INTERVAL_S], "metrics.interval_s", 0.0, 86400.0, true)) {
    return false;
  }
  if (Checker::given(metrics, c::F_METRIC_SCHEMA_BUILD_LATENCY_US) &&
      !k.number(metrics[c::F_METRIC_SCHEMA_BUILD_LATENCY_US], "metrics.build_latency_us", 0.0, MAX_MICROS)) {
    return false;
  }
  const json& lat = metrics[c::F_METRIC_SCHEMA_LATENCY];
  if (!k.object(lat, "metrics.latency", {c::F_LATENCY_LAYOUT_START_US, c::F_LATENCY_LAYOUT_FACTOR, c::F_LATENCY_LAYOUT_COUNT},
                {c::F_LATENCY_LAYOUT_START_US, c::F_LATENCY_LAYOUT_FACTOR, c::F_LATENCY_LAYOUT_COUNT}) ||
      !k.number(lat[c::F_LATENCY_LAYOUT_START_US], "metrics.latency.start_us", 0.0, MAX_MICROS, true) ||
      !k.number(lat[c::F_LATENCY_LAYOUT_FACTOR], "metrics.latency.factor", 1.0, 16.0, true) ||
      !k.count(lat[c::F_LATENCY_LAYOUT_COUNT], "metrics.latency.count", c::MAX_LATENCY_BUCKETS, 1)) {
    return false;
  }
  const json& outputs = metrics[c::F_METRIC_SCHEMA_OUTPUTS];
  if (!outputs.is_array() || outputs.size() > c::MAX_OUTPUTS) {
    return k.fail("metrics.outputs", "must be a list of at most " + std::to_string(c::MAX_OUTPUTS));
  }
  std::set<std::string> names;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (!output_layout(k, outputs[i], "metrics.outputs[" + std::to_string(i) + "]", names)) return false;
  }
  return true;
}

bool latency_window(Checker& k, const json& lat, const std::string& where) {
  if (!k.object(lat, where,
                {c::F_LATENCY_WINDOW_COUNTS, c::F_LATENCY_WINDOW_UNDERFLOW, c::F_LATENCY_WINDOW_OVERFLOW,
                 c::F_LATENCY_WINDOW_SUM_US, c::F_LATENCY_WINDOW_MAX_US, c::F_LATENCY_WINDOW_P50_US,
                 c::F_LATENCY_WINDOW_P95_US, c::F_LATENCY_WINDOW_P99_US},
                {c::F_LATENCY_WINDOW_COUNTS, c::F_LATENCY_WINDOW_UNDERFLOW, c::F_LATENCY_WINDOW_OVERFLOW,
                 c::F_LATENCY_WINDOW_SUM_US, c::F_LATENCY_WINDOW_MAX_US, c::F_LATENCY_WINDOW_P50_US,
                 c::F_LATENCY_WINDOW_P95_US, c::F_LATENCY_WINDOW_P99_US}) ||
      !k.counts(lat[c::F_LATENCY_WINDOW_COUNTS], Checker::at(where, c::F_LATENCY_WINDOW_COUNTS), c::MAX_LATENCY_BUCKETS,
                c::MAX_WINDOW_COUNT) ||
      !k.count(lat[c::F_LATENCY_WINDOW_UNDERFLOW], Checker::at(where, c::F_LATENCY_WINDOW_UNDERFLOW), c::MAX_WINDOW_COUNT) ||
      !k.count(lat[c::F_LATENCY_WINDOW_OVERFLOW], Checker::at(where, c::F_LATENCY_WINDOW_OVERFLOW), c::MAX_WINDOW_COUNT)) {
    return false;
  }
  for (const char* name : {c::F_LATENCY_WINDOW_SUM_US, c::F_LATENCY_WINDOW_MAX_US, c::F_LATENCY_WINDOW_P50_US,
                           c::F_LATENCY_WINDOW_P95_US, c::F_LATENCY_WINDOW_P99_US}) {
    if (!k.number(lat[name], Checker::at(where, name), 0.0, MAX_MICROS)) return false;
  }
  return true;
}

bool output_window(Checker& k, const json& o, const std::string& where) {
  if (!k.object(o, where,
                {c::F_OUTPUT_WINDOW_COUNTS, c::F_OUTPUT_WINDOW_UNDERFLOW, c::F_OUTPUT_WINDOW_OVERFLOW,
                 c::F_OUTPUT_WINDOW_NAN, c::F_OUTPUT_WINDOW_SEEN, c::F_OUTPUT_WINDOW_BINNED},
                {c::F_OUTPUT_WINDOW_COUNTS, c::F_OUTPUT_WINDOW_UNDERFLOW, c::F_OUTPUT_WINDOW_OVERFLOW,
                 c::F_OUTPUT_WINDOW_NAN, c::F_OUTPUT_WINDOW_SEEN, c::F_OUTPUT_WINDOW_BINNED}) ||
      !k.counts(o[c::F_OUTPUT_WINDOW_COUNTS], Checker::at(where, c::F_OUTPUT_WINDOW_COUNTS), c::MAX_CLASSES,
                c::MAX_WINDOW_COUNT)) {
    return false;
  }
  for (const char* name : {c::F_OUTPUT_WINDOW_UNDERFLOW, c::F_OUTPUT_WINDOW_OVERFLOW, c::F_OUTPUT_WINDOW_NAN,
                           c::F_OUTPUT_WINDOW_SEEN, c::F_OUTPUT_WINDOW_BINNED}) {
    if (!k.count(o[name], Checker::at(where, name), c::MAX_WINDOW_COUNT)) return false;
  }
  return true;
}

// An object of at most MAX_OUTPUTS outputs, keyed by names of 1 to MAX_LABEL characters; `each` checks a value.
template <typename Each>
bool outputs_map(Checker& k, const json& outputs, Each each) {
  if (!outputs.is_object() || outputs.size() > c::MAX_OUTPUTS) {
    return k.fail("outputs", "must be an object of at most " + std::to_string(c::MAX_OUTPUTS) + " outputs");
  }
  for (const auto& item : outputs.items()) {
    const std::string where = "outputs." + item.key();
    if (Checker::length(item.key()) < 1 || Checker::length(item.key()) > c::MAX_LABEL) {
      return k.fail(where, "the output name must hold 1 to " + std::to_string(c::MAX_LABEL) + " characters");
    }
    if (!each(item.value(), where)) return false;
  }
  return true;
}

bool telemetry(Checker& k, const json& m) {
  if (!k.matches(m[c::F_TELEMETRY_ARTIFACT_SHA256], c::F_TELEMETRY_ARTIFACT_SHA256, sha_pattern())) return false;
  for (const char* name : {c::F_TELEMETRY_WINDOW_START_MS, c::F_TELEMETRY_WINDOW_END_MS}) {
    if (!k.count(m[name], name)) return false;
  }
  for (const char* name : {c::F_TELEMETRY_RUNS, c::F_TELEMETRY_ERRORS, c::F_TELEMETRY_NAN_INPUT_RUNS,
                           c::F_TELEMETRY_NAN_INPUT_VALUES}) {
    if (!k.count(m[name], name, c::MAX_WINDOW_COUNT)) return false;
  }
  if (!latency_window(k, m[c::F_TELEMETRY_LATENCY], "latency") ||
      !outputs_map(k, m[c::F_TELEMETRY_OUTPUTS],
                   [&k](const json& o, const std::string& where) { return output_window(k, o, where); })) {
    return false;
  }
  const json& process = m[c::F_TELEMETRY_PROCESS];
  if (!k.object(process, "process",
                {c::F_PROCESS_WINDOW_RSS_BYTES, c::F_PROCESS_WINDOW_CPU_SECONDS, c::F_PROCESS_WINDOW_CPU_PERCENT},
                {c::F_PROCESS_WINDOW_RSS_BYTES, c::F_PROCESS_WINDOW_CPU_SECONDS, c::F_PROCESS_WINDOW_CPU_PERCENT}) ||
      !k.count(process[c::F_PROCESS_WINDOW_RSS_BYTES], "process.rss_bytes") ||
      !k.number(process[c::F_PROCESS_WINDOW_CPU_SECONDS], "process.cpu_seconds", 0.0, MAX_MICROS) ||
      !k.number(process[c::F_PROCESS_WINDOW_CPU_PERCENT], "process.cpu_percent", 0.0, MAX_MICROS)) {
    return false;
  }
  if (Checker::given(m, c::F_TELEMETRY_TEMPERATURE_C) &&
      !k.number(m[c::F_TELEMETRY_TEMPERATURE_C], c::F_TELEMETRY_TEMPERATURE_C, -273.15, 1000.0)) {
    return false;
  }
  const json& spool = m[c::F_TELEMETRY_SPOOL];
  return k.object(spool, "spool", {c::F_SPOOL_STATE_QUEUED, c::F_SPOOL_STATE_DROPPED_TOTAL},
                  {c::F_SPOOL_STATE_QUEUED, c::F_SPOOL_STATE_DROPPED_TOTAL}) &&
         k.count(spool[c::F_SPOOL_STATE_QUEUED], "spool.queued") &&
         k.count(spool[c::F_SPOOL_STATE_DROPPED_TOTAL], "spool.dropped_total");
}

bool shadow_output(Checker& k, const json& o, const std::string& where) {
  if (!k.object(o, where,
                {c::F_SHADOW_OUTPUT_COMPARED, c::F_SHADOW_OUTPUT_ROWS, c::F_SHADOW_OUTPUT_AGREE,
                 c::F_SHADOW_OUTPUT_MAX_ABS_ERR, c::F_SHADOW_OUTPUT_MAX_REL_ERR, c::F_SHADOW_OUTPUT_NAN,
                 c::F_SHADOW_OUTPUT_HISTOGRAM},
                {c::F_SHADOW_OUTPUT_COMPARED, c::F_SHADOW_OUTPUT_ROWS, c::F_SHADOW_OUTPUT_MAX_ABS_ERR,
                 c::F_SHADOW_OUTPUT_MAX_REL_ERR, c::F_SHADOW_OUTPUT_NAN})) {
    return false;
  }
  for (const char* name : {c::F_SHADOW_OUTPUT_COMPARED, c::F_SHADOW_OUTPUT_ROWS, c::F_SHADOW_OUTPUT_NAN}) {
    if (!k.count(o[name], Checker::at(where, name))) return false;
  }
  if (Checker::given(o, c::F_SHADOW_OUTPUT_AGREE) && !k.count(o[c::F_SHADOW_OUTPUT_AGREE], Checker::at(where, c::F_SHADOW_OUTPUT_AGREE))) {
    return false;
  }
  for (const char* name : {c::F_SHADOW_OUTPUT_MAX_ABS_ERR, c::F_SHADOW_OUTPUT_MAX_REL_ERR}) {
    if (!k.number(o[name], Checker::at(where, name), 0.0, MAX_MICROS)) return false;
  }
  return !Checker::given(o, c::F_SHADOW_OUTPUT_HISTOGRAM) ||
         output_window(k, o[c::F_SHADOW_OUTPUT_HISTOGRAM], Checker::at(where, c::F_SHADOW_OUTPUT_HISTOGRAM));
}

bool shadow_window(Checker& k, const json& m) {
  if (!k.matches(m[c::F_SHADOW_WINDOW_SHADOW_ID], c::F_SHADOW_WINDOW_SHADOW_ID, id_pattern()) ||
      !k.count(m[c::F_SHADOW_WINDOW_CANDIDATE], c::F_SHADOW_WINDOW_CANDIDATE, c::MAX_SHADOW_CANDIDATES - 1) ||
      !k.matches(m[c::F_SHADOW_WINDOW_CANDIDATE_SHA256], c::F_SHADOW_WINDOW_CANDIDATE_SHA256, sha_pattern()) ||
      !k.matches(m[c::F_SHADOW_WINDOW_SERVING_SHA256], c::F_SHADOW_WINDOW_SERVING_SHA256, sha_pattern())) {
    return false;
  }
  for (const char* name : {c::F_SHADOW_WINDOW_SHADOW_VERSION, c::F_SHADOW_WINDOW_WINDOW_START_MS,
                           c::F_SHADOW_WINDOW_WINDOW_END_MS, c::F_SHADOW_WINDOW_OFFERED, c::F_SHADOW_WINDOW_SAMPLES,
                           c::F_SHADOW_WINDOW_DROPPED, c::F_SHADOW_WINDOW_ERRORS, c::F_SHADOW_WINDOW_RSS_INCREASE_BYTES}) {
    if (!k.count(m[name], name)) return false;
  }
  // Paired timing (optional: an agent without it, or a child that could not open the serving model).
  if (Checker::given(m, c::F_SHADOW_WINDOW_PAIRED_SAMPLES) &&
      !k.count(m[c::F_SHADOW_WINDOW_PAIRED_SAMPLES], c::F_SHADOW_WINDOW_PAIRED_SAMPLES)) {
    return false;
  }
  if (Checker::given(m, c::F_SHADOW_WINDOW_PAIRED_SERVING_LATENCY) &&
      !latency_window(k, m[c::F_SHADOW_WINDOW_PAIRED_SERVING_LATENCY], "paired_serving_latency")) {
    return false;
  }
  return k.number(m[c::F_SHADOW_WINDOW_CPU_SECONDS], c::F_SHADOW_WINDOW_CPU_SECONDS, 0.0, MAX_MICROS) &&
         latency_window(k, m[c::F_SHADOW_WINDOW_LATENCY], "latency") &&
         latency_window(k, m[c::F_SHADOW_WINDOW_SERVING_LATENCY], "serving_latency") &&
         outputs_map(k, m[c::F_SHADOW_WINDOW_OUTPUTS],
                     [&k](const json& o, const std::string& where) { return shadow_output(k, o, where); });
}

bool deploy_report(Checker& k, const json& d, const std::string& where) {
  if (!k.object(d, where, {}, {}, true)) return false;  // unknown fields are ignored, as the monitor does
  if (Checker::given(d, c::F_DEPLOY_REPORT_SLOT) && !k.matches(d[c::F_DEPLOY_REPORT_SLOT], where + ".slot", slot_pattern())) {
    return false;
  }
  if (Checker::given(d, c::F_DEPLOY_REPORT_ARTIFACT) && !k.text(d[c::F_DEPLOY_REPORT_ARTIFACT], where + ".artifact", c::MAX_LABEL)) {
    return false;
  }
  if (Checker::given(d, c::F_DEPLOY_REPORT_DESIRED_VERSION) &&
      !k.count(d[c::F_DEPLOY_REPORT_DESIRED_VERSION], where + ".desired_version")) {
    return false;
  }
  if (Checker::given(d, c::F_DEPLOY_REPORT_DEPLOYMENT_ID) &&
      !k.matches(d[c::F_DEPLOY_REPORT_DEPLOYMENT_ID], where + ".deployment_id", id_pattern())) {
    return false;
  }
  if (Checker::given(d, c::F_DEPLOY_REPORT_RESULT) &&
      !k.word(d[c::F_DEPLOY_REPORT_RESULT], where + ".result",
              {c::DEPLOY_RESULT_IN_PROGRESS, c::DEPLOY_RESULT_APPLIED, c::DEPLOY_RESULT_FAILED, c::DEPLOY_RESULT_REFUSED})) {
    return false;
  }
  if (Checker::given(d, c::F_DEPLOY_REPORT_PHASE) &&
      !k.word(d[c::F_DEPLOY_REPORT_PHASE], where + ".phase",
              {c::DEPLOY_PHASE_DOWNLOAD, c::DEPLOY_PHASE_VERIFY, c::DEPLOY_PHASE_SELF_TEST, c::DEPLOY_PHASE_SWITCH})) {
    return false;
  }
  if (Checker::given(d, c::F_DEPLOY_REPORT_ERROR) && !k.text(d[c::F_DEPLOY_REPORT_ERROR], where + ".error", c::MAX_ERROR)) {
    return false;
  }
  if (Checker::given(d, c::F_DEPLOY_REPORT_PREVIOUS_SLOT)) {
    const json& p = d[c::F_DEPLOY_REPORT_PREVIOUS_SLOT];
    const std::string w = where + ".previous_slot";
    if (!k.object(p, w, {c::F_PREVIOUS_SLOT_SLOT, c::F_PREVIOUS_SLOT_ARTIFACT_SHA256}, {c::F_PREVIOUS_SLOT_ARTIFACT_SHA256}) ||
        !k.matches(p[c::F_PREVIOUS_SLOT_ARTIFACT_SHA256], w + ".artifact_sha256", sha_pattern())) {
      return false;
    }
    if (Checker::given(p, c::F_PREVIOUS_SLOT_SLOT) && !k.matches(p[c::F_PREVIOUS_SLOT_SLOT], w + ".slot", slot_pattern())) {
      return false;
    }
  }
  return true;
}

bool shadow_report(Checker& k, const json& d, const std::string& where) {
  if (!k.object(d, where, {}, {c::F_SHADOW_REPORT_SHADOW_ID}, true) ||  // unknown fields are ignored
      !k.matches(d[c::F_SHADOW_REPORT_SHADOW_ID], Checker::at(where, c::F_SHADOW_REPORT_SHADOW_ID), id_pattern())) {
    return false;
  }
  if (Checker::given(d, c::F_SHADOW_REPORT_SHADOW_VERSION) &&
      !k.count(d[c::F_SHADOW_REPORT_SHADOW_VERSION], Checker::at(where, c::F_SHADOW_REPORT_SHADOW_VERSION))) {
    return false;
  }
  if (Checker::given(d, c::F_SHADOW_REPORT_CANDIDATE) &&
      !k.count(d[c::F_SHADOW_REPORT_CANDIDATE], Checker::at(where, c::F_SHADOW_REPORT_CANDIDATE), c::MAX_SHADOW_CANDIDATES - 1)) {
    return false;
  }
  if (Checker::given(d, c::F_SHADOW_REPORT_CANDIDATE_SHA256) &&
      !k.matches(d[c::F_SHADOW_REPORT_CANDIDATE_SHA256], Checker::at(where, c::F_SHADOW_REPORT_CANDIDATE_SHA256), sha_pattern())) {
    return false;
  }
  if (Checker::given(d, c::F_SHADOW_REPORT_REASON) &&
      !k.word(d[c::F_SHADOW_REPORT_REASON], Checker::at(where, c::F_SHADOW_REPORT_REASON),
              {c::SHADOW_END_DURATION, c::SHADOW_END_STOPPED, c::SHADOW_END_SUPERSEDED, c::SHADOW_END_SERVING_CHANGED})) {
    return false;
  }
  if (Checker::given(d, c::F_SHADOW_REPORT_ERROR) && !k.text(d[c::F_SHADOW_REPORT_ERROR], Checker::at(where, c::F_SHADOW_REPORT_ERROR), c::MAX_ERROR)) {
    return false;
  }
  return !Checker::given(d, c::F_SHADOW_REPORT_RSS_INCREASE_BYTES) ||
         k.count(d[c::F_SHADOW_REPORT_RSS_INCREASE_BYTES], Checker::at(where, c::F_SHADOW_REPORT_RSS_INCREASE_BYTES));
}

bool capture_report(Checker& k, const json& d, const std::string& where) {
  if (!k.object(d, where, {}, {c::F_CAPTURE_REPORT_CAPTURE_ID}, true) ||  // unknown fields are ignored
      !k.matches(d[c::F_CAPTURE_REPORT_CAPTURE_ID], Checker::at(where, c::F_CAPTURE_REPORT_CAPTURE_ID), id_pattern())) {
    return false;
  }
  for (const char* field : {c::F_CAPTURE_REPORT_CAPTURE_VERSION, c::F_CAPTURE_REPORT_SAMPLES, c::F_CAPTURE_REPORT_BYTES,
                            c::F_CAPTURE_REPORT_STORED_SAMPLES, c::F_CAPTURE_REPORT_STORED_BYTES}) {
    if (Checker::given(d, field) && !k.count(d[field], Checker::at(where, field))) return false;
  }
  if (Checker::given(d, c::F_CAPTURE_REPORT_REASON) &&
      !k.word(d[c::F_CAPTURE_REPORT_REASON], Checker::at(where, c::F_CAPTURE_REPORT_REASON),
              {c::CAPTURE_DROP_BUDGET, c::CAPTURE_DROP_DISK_FULL, c::CAPTURE_DROP_RETENTION, c::CAPTURE_DROP_REFUSED})) {
    return false;
  }
  if (Checker::given(d, c::F_CAPTURE_REPORT_STOP) &&
      !k.word(d[c::F_CAPTURE_REPORT_STOP], Checker::at(where, c::F_CAPTURE_REPORT_STOP),
              {c::CAPTURE_STOP_STOPPED, c::CAPTURE_STOP_SUPERSEDED, c::CAPTURE_STOP_BUDGET, c::CAPTURE_STOP_EXPIRED})) {
    return false;
  }
  return !Checker::given(d, c::F_CAPTURE_REPORT_ERROR) ||
         k.text(d[c::F_CAPTURE_REPORT_ERROR], Checker::at(where, c::F_CAPTURE_REPORT_ERROR), c::MAX_ERROR);
}

bool event(Checker& k, const json& m) {
  if (!k.matches(m[c::F_EVENT_EVENT], c::F_EVENT_EVENT, event_pattern()) ||
      !k.text(m[c::F_EVENT_MESSAGE], c::F_EVENT_MESSAGE, c::MAX_MESSAGE)) {
    return false;
  }
  if (!m.contains(c::F_EVENT_DETAILS)) return true;
  const json& details = m[c::F_EVENT_DETAILS];
  if (!details.is_object() || details.size() > c::MAX_DETAILS) {
    return k.fail("details", "must be an object of at most " + std::to_string(c::MAX_DETAILS) + " fields");
  }
  for (const auto& item : details.items()) {
    if (item.key().empty() || Checker::length(item.key()) > 64) return k.fail("details", "has a key of over 64 characters");
  }
  const std::string& name = m[c::F_EVENT_EVENT].get_ref<const std::string&>();
  if (name.rfind("deploy.", 0) == 0) return deploy_report(k, details, "details");
  if (name.rfind("shadow.", 0) == 0) return shadow_report(k, details, "details");
  if (name.rfind("capture.", 0) == 0) return capture_report(k, details, "details");
  return true;
}

}  // namespace

std::string contract_message_problem(const json& m) {
  Checker k;
  if (!m.is_object()) return "the message is not a JSON object";
  if (!m.contains(c::F_KIND) || !m[c::F_KIND].is_string()) return "the message has no kind";
  const std::string& kind = m[c::F_KIND].get_ref<const std::string&>();
  // Each kind's fields, beyond the envelope's.
  std::vector<const char*> fields, required;
  if (kind == c::MESSAGE_KIND_BIRTH) {
    fields = {c::F_BIRTH_TARGET, c::F_BIRTH_RUNTIME, c::F_BIRTH_ARTIFACT, c::F_BIRTH_METRICS};
    required = fields;
  } else if (kind == c::MESSAGE_KIND_DEATH) {
    fields = {c::F_DEATH_REASON};
    required = fields;
  } else if (kind == c::MESSAGE_KIND_TELEMETRY) {
    fields = {c::F_TELEMETRY_ARTIFACT_SHA256, c::F_TELEMETRY_WINDOW_START_MS, c::F_TELEMETRY_WINDOW_END_MS,
              c::F_TELEMETRY_RUNS, c::F_TELEMETRY_ERRORS, c::F_TELEMETRY_NAN_INPUT_RUNS, c::F_TELEMETRY_NAN_INPUT_VALUES,
              c::F_TELEMETRY_LATENCY, c::F_TELEMETRY_OUTPUTS, c::F_TELEMETRY_PROCESS, c::F_TELEMETRY_TEMPERATURE_C,
              c::F_TELEMETRY_SPOOL};
    required = {c::F_TELEMETRY_ARTIFACT_SHA256, c::F_TELEMETRY_WINDOW_START_MS, c::F_TELEMETRY_WINDOW_END_MS,
                c::F_TELEMETRY_RUNS, c::F_TELEMETRY_ERRORS, c::F_TELEMETRY_NAN_INPUT_RUNS,
                c::F_TELEMETRY_NAN_INPUT_VALUES, c::F_TELEMETRY_LATENCY, c::F_TELEMETRY_OUTPUTS, c::F_TELEMETRY_PROCESS,
                c::F_TELEMETRY_SPOOL};
  } else if (kind == c::MESSAGE_KIND_EVENT) {
    fields = {c::F_EVENT_EVENT, c::F_EVENT_MESSAGE, c::F_EVENT_DETAILS};
    required = {c::F_EVENT_EVENT, c::F_EVENT_MESSAGE};
  } else if (kind == c::MESSAGE_KIND_STATE) {
    fields = {c::F_STATE_ARTIFACT_SHA256, c::F_STATE_DETAILS};
    required = {c::F_STATE_ARTIFACT_SHA256};
  } else if (kind == c::MESSAGE_KIND_SHADOW) {
    fields = {c::F_SHADOW_WINDOW_SHADOW_ID, c::F_SHADOW_WINDOW_SHADOW_VERSION, c::F_SHADOW_WINDOW_CANDIDATE,
              c::F_SHADOW_WINDOW_CANDIDATE_SHA256, c::F_SHADOW_WINDOW_SERVING_SHA256, c::F_SHADOW_WINDOW_WINDOW_START_MS,
              c::F_SHADOW_WINDOW_WINDOW_END_MS, c::F_SHADOW_WINDOW_OFFERED, c::F_SHADOW_WINDOW_SAMPLES,
              c::F_SHADOW_WINDOW_DROPPED, c::F_SHADOW_WINDOW_ERRORS, c::F_SHADOW_WINDOW_LATENCY,
              c::F_SHADOW_WINDOW_SERVING_LATENCY, c::F_SHADOW_WINDOW_OUTPUTS, c::F_SHADOW_WINDOW_RSS_INCREASE_BYTES,
              c::F_SHADOW_WINDOW_CPU_SECONDS};
    required = fields;
    fields.push_back(c::F_SHADOW_WINDOW_PAIRED_SAMPLES);  // optional: paired timing
    fields.push_back(c::F_SHADOW_WINDOW_PAIRED_SERVING_LATENCY);
  } else {
    return "kind: '" + kind.substr(0, 64) + "' is not one of the contract's message kinds";
  }
  std::set<std::string> allowed(fields.begin(), fields.end());
  for (const char* name : {c::F_KIND, c::F_ENVELOPE_V, c::F_ENVELOPE_FLEET, c::F_ENVELOPE_DEVICE, c::F_ENVELOPE_EPOCH,
                           c::F_ENVELOPE_BDSEQ, c::F_ENVELOPE_SEQ, c::F_ENVELOPE_TS_MS, c::F_ENVELOPE_HISTORICAL}) {
    allowed.insert(name);
  }
  for (const auto& item : m.items()) {
    if (allowed.count(item.key()) == 0) return "the message has an unknown field '" + item.key().substr(0, 64) + "'";
  }
  for (const char* name : {c::F_ENVELOPE_FLEET, c::F_ENVELOPE_DEVICE, c::F_ENVELOPE_EPOCH, c::F_ENVELOPE_BDSEQ,
                           c::F_ENVELOPE_SEQ, c::F_ENVELOPE_TS_MS}) {
    if (!m.contains(name)) return std::string("the message lacks '") + name + "'";
  }
  for (const char* name : required) {
    if (!m.contains(name)) return std::string("the message lacks '") + name + "'";
  }
  if (m.contains(c::F_ENVELOPE_V) &&
      (!m[c::F_ENVELOPE_V].is_number_integer() || m[c::F_ENVELOPE_V].get<int64_t>() != c::PROTOCOL_VERSION)) {
    return "v: the message is not protocol version " + std::to_string(c::PROTOCOL_VERSION);
  }
  if (m.contains(c::F_ENVELOPE_HISTORICAL) && !m[c::F_ENVELOPE_HISTORICAL].is_boolean()) {
    return "historical: must be true or false";
  }
  const bool envelope_ok = k.matches(m[c::F_ENVELOPE_FLEET], c::F_ENVELOPE_FLEET, id_pattern()) &&
                           k.matches(m[c::F_ENVELOPE_DEVICE], c::F_ENVELOPE_DEVICE, id_pattern()) &&
                           k.matches(m[c::F_ENVELOPE_EPOCH], c::F_ENVELOPE_EPOCH, epoch_pattern()) &&
                           k.count(m[c::F_ENVELOPE_BDSEQ], c::F_ENVELOPE_BDSEQ) &&
                           k.count(m[c::F_ENVELOPE_SEQ], c::F_ENVELOPE_SEQ) &&
                           k.count(m[c::F_ENVELOPE_TS_MS], c::F_ENVELOPE_TS_MS);
  if (!envelope_ok) return k.problem;
  if (kind == c::MESSAGE_KIND_BIRTH) {
    birth(k, m);
  } else if (kind == c::MESSAGE_KIND_DEATH) {
    k.word(m[c::F_DEATH_REASON], c::F_DEATH_REASON, {c::DEATH_REASON_CONNECTION_LOST, c::DEATH_REASON_SHUTDOWN});
  } else if (kind == c::MESSAGE_KIND_TELEMETRY) {
    telemetry(k, m);
  } else if (kind == c::MESSAGE_KIND_EVENT) {
    event(k, m);
  } else if (kind == c::MESSAGE_KIND_SHADOW) {
    shadow_window(k, m);
  } else {
    const bool sha_ok = m[c::F_STATE_ARTIFACT_SHA256].is_null() ||
                        k.matches(m[c::F_STATE_ARTIFACT_SHA256], c::F_STATE_ARTIFACT_SHA256, sha_pattern());
    if (sha_ok && m.contains(c::F_STATE_DETAILS)) deploy_report(k, m[c::F_STATE_DETAILS], "details");
  }
  return k.problem;
}

}  // namespace edgesmith
