#include "agent/capture_record.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>

#include "common/contract_words.h"
#include "common/error.h"

namespace edgesmith {

namespace c = contract;

namespace {

const std::set<std::string>& record_dtypes() {
  static const std::set<std::string> dtypes = {"float32", "float16", "int8", "uint8", "int32", "int64", "bool"};
  return dtypes;
}

}  // namespace

bool capture_confidence(const Manifest& manifest, const std::vector<Tensor>& outputs, int64_t* top1, double* confidence) {
  for (const ManifestOutputMonitor& monitor : manifest.monitoring.outputs) {
    if (monitor.kind != MONITOR_KIND_CLASSES) continue;
    for (size_t i = 0; i < manifest.outputs.size() && i < outputs.size(); ++i) {
      if (manifest.outputs[i].name != monitor.name) continue;
      const Tensor& t = outputs[i];
      if (t.dtype() != DTYPE_FLOAT32 || t.shape().empty() || t.shape().back() <= 0) return false;
      const int64_t classes = t.shape().back();
      const float* row = static_cast<const float*>(t.data());
      int64_t best = 0;
      for (int64_t k = 1; k < classes; ++k) {
        if (row[k] > row[best]) best = k;
      }
      if (!std::isfinite(row[best])) return false;
      double sum = 0.0;  // softmax's denominator, shifted by the max for stability
      for (int64_t k = 0; k < classes; ++k) sum += std::isfinite(row[k]) ? std::exp(static_cast<double>(row[k]) - row[best]) : 0.0;
      *top1 = best;
      *confidence = std::min(1.0, std::max(0.0, 1.0 / sum));
      return true;
    }
  }
  return false;
}

std::string capture_record_unfit(const std::vector<Tensor>& tensors) {
  for (const Tensor& t : tensors) {
    const std::string dtype = dtype_name(t.dtype());
    if (record_dtypes().count(dtype) == 0) return "a capture record cannot hold a " + dtype + " tensor";
    if (t.shape().size() > c::MAX_CAPTURE_RANK) return "a capture record holds tensors of rank 8 at most";
  }
  return "";
}

std::string capture_record_build(const nlohmann::json& header_fields, const std::vector<std::string>& input_names,
                                 const std::vector<Tensor>& inputs, const std::vector<std::string>& output_names,
                                 const std::vector<Tensor>& outputs) {
  nlohmann::json header = header_fields;
  uint64_t offset = 0;
  const auto describe = [&](const std::vector<std::string>& names, const std::vector<Tensor>& tensors) {
    nlohmann::json list = nlohmann::json::array();
    for (size_t i = 0; i < tensors.size(); ++i) {
      const std::string dtype = dtype_name(tensors[i].dtype());
      if (record_dtypes().count(dtype) == 0) {
        throw Error(ERROR_CODE_INVALID_ARGUMENT, "a capture record cannot hold a " + dtype + " tensor");
      }
      if (tensors[i].shape().size() > c::MAX_CAPTURE_RANK) {
        throw Error(ERROR_CODE_INVALID_ARGUMENT, "a capture record holds tensors of rank 8 at most");
      }
      const uint64_t nbytes = tensors[i].byte_size();
      list.push_back({{c::F_CAPTURE_TENSOR_NAME, i < names.size() ? names[i] : "t" + std::to_string(i)},
                      {c::F_CAPTURE_TENSOR_DTYPE, dtype},
                      {c::F_CAPTURE_TENSOR_SHAPE, tensors[i].shape()},
                      {c::F_CAPTURE_TENSOR_OFFSET, offset},
                      {c::F_CAPTURE_TENSOR_NBYTES, nbytes}});
      offset += nbytes;
    }
    return list;
  };
  header[c::F_CAPTURE_RECORD_INPUTS] = describe(input_names, inputs);
  header[c::F_CAPTURE_RECORD_OUTPUTS] = describe(output_names, outputs);
  if (offset > c::MAX_CAPTURE_RECORD) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "the sample's tensors hold " + std::to_string(offset) +
                                                 " bytes, over a capture record's " + std::to_string(c::MAX_CAPTURE_RECORD));
  }
  const std::string text = header.dump();
  if (text.size() > c::MAX_CAPTURE_HEADER) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "the capture record's header is over " + std::to_string(c::MAX_CAPTURE_HEADER) + " bytes");
  }
  char length[16];
  std::snprintf(length, sizeof(length), "%08zx\n", text.size());
  std::string record = c::CAPTURE_MAGIC;
  record.reserve(record.size() + 9 + text.size() + offset);
  record += length;
  record += text;
  for (const std::vector<Tensor>* list : {&inputs, &outputs}) {
    for (const Tensor& t : *list) record.append(static_cast<const char*>(t.data()), t.byte_size());
  }
  return record;
}

}  // namespace edgesmith
