// The signed capture state a device receives, retained, on its `capture-desired` topic
// (docs/capture.md §1, runtime/contract.py CaptureState): the same envelope and deploy keys as
// desired and shadow states, signed over contract::CAPTURE_DOMAIN, with its own version floor.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace edgesmith {

/// Which served requests are captured (contract CapturePolicy); the first switch that takes a
/// sample, in this order, is its reason.
struct CapturePolicy {
  double uniform = 0.0;         ///< share of served requests, 0..1
  double low_confidence = 0.0;  ///< capture when the classes output's max softmax is below this; 0: off
  bool drift = false;           ///< the central side flagged this device's inputs as drifted
  double drift_rate = 0.0;      ///< with drift: share of served requests
  bool disagreement = false;    ///< a running shadow's top-1 differs from serving's
};

/// A verified capture state.
struct CaptureState {
  std::string fleet;
  std::string device;
  uint64_t version = 0;   ///< the capture states' own counter (the capture floor)
  std::string capture_id;
  std::string action;     ///< "start", "stop" or "upload"
  int64_t issued_at_ms = 0;
  int64_t not_after = 0;  ///< Unix seconds; 0: none given
  CapturePolicy policy;
  uint64_t max_samples = 500;
  uint64_t max_bytes = 64ull << 20;
  uint64_t retention_s = 7 * 24 * 3600;
  std::string upload_url;    ///< http:// or https://
  std::string upload_token;  ///< 64 hex digits for "start", empty otherwise
  std::string signed_sha256; ///< SHA-256 of the signed text
};

/// Check the signed text's fields (the contract's CaptureState: kind "capture", ids, bounds, an
/// http(s) upload_url, a 64-hex upload_token on start and none on stop/upload, no unknown field).
/// Throws Error(ERROR_CODE_INTEGRITY) with one sentence starting "the capture state is refused: ".
CaptureState capture_state_from_text(const std::string& signed_text);

/// Parse an envelope, check its key and signature (over CAPTURE_DOMAIN) against `deploy_keys`,
/// then its fields. Throws Error(ERROR_CODE_INTEGRITY) with one sentence.
CaptureState capture_state_parse(const std::string& envelope, const std::vector<std::vector<uint8_t>>& deploy_keys);

/// Past not_after by more than DESIRED_CLOCK_SKEW_S at `now_s` (the desired states' rule).
bool capture_state_expired(const CaptureState& state, int64_t now_s);

/// The capture id of an envelope read without any check ("" when none): to name a refusal.
std::string capture_state_unverified_id(const std::string& envelope);

/// What capture_state_admit decided.
enum CaptureAdmit : int32_t {
  CAPTURE_ADMIT_TAKEN = 0,     ///< new: the floor now holds its version
  CAPTURE_ADMIT_REPEATED = 1,  ///< the state already taken (the retained message again): nothing to do
};


/// Admit a verified state for this device: refused (Error(ERROR_CODE_INTEGRITY), one sentence)
/// when it names another fleet or device, its upload_url is plain http:// to another host than
/// the loopback (the token would travel in clear), its version is not above the floor in `floor_path`
/// (a replay), or it expired at `now_s`. A new state's version is written to the floor (durably,
/// before the state takes effect) so a crash never lets it in twice.
CaptureAdmit capture_state_admit(const CaptureState& state, const std::string& floor_path, const std::string& fleet,
                                 const std::string& device, int64_t now_s);

/// The highest version the floor in `floor_path` holds (0: none).
uint64_t capture_floor_read(const std::string& floor_path);

}  // namespace edgesmith
