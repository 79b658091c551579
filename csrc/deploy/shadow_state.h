// The signed shadow state a device receives, retained, on its `shadow-desired` topic
// (docs/shadow.md, runtime/contract.py ShadowState): the same envelope, deploy keys and
// anti-replay rules as desired states, signed over contract::SHADOW_DOMAIN instead.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "deploy/desired.h"

namespace edgesmith {

/// A verified shadow state.
struct ShadowState {
  std::string fleet;
  std::string device;
  uint64_t version = 0;   ///< its own counter (the shadow floor), not the desired states'
  std::string shadow_id;
  std::string action;     ///< "start" or "stop"
  int64_t issued_at_ms = 0;
  int64_t not_after = 0;  ///< Unix seconds; 0: none given
  int64_t starts_at_ms = 0;
  uint64_t duration_s = 3600;
  double sample = 0.1;
  double cpu_share = 0.5;
  uint64_t queue = 4;
  uint64_t max_bytes = 256ull << 20;
  std::vector<DesiredArtifact> candidates;  ///< run one after another; empty for "stop"
  std::string signed_sha256;                ///< SHA-256 of the signed text
};

/// Check the signed text's fields (the contract's ShadowState: kind "shadow", ids, bounds,
/// start names 1..MAX_SHADOW_CANDIDATES candidates, stop none, no unknown field). Throws
/// Error(ERROR_CODE_INTEGRITY) with one sentence.
ShadowState shadow_state_from_text(const std::string& signed_text);

/// Parse an envelope, check its key and signature (over SHADOW_DOMAIN) against `deploy_keys`,
/// then its fields. Throws Error(ERROR_CODE_INTEGRITY) with one sentence saying why it is refused.
ShadowState shadow_state_parse(const std::string& envelope, const std::vector<std::vector<uint8_t>>& deploy_keys);

/// Past not_after by more than DESIRED_CLOCK_SKEW_S at `now_s` (the desired states' rule).
bool shadow_state_expired(const ShadowState& state, int64_t now_s);

/// The shadow id of an envelope read without any check ("" when none): to name a refusal.
std::string shadow_state_unverified_id(const std::string& envelope);

/// Candidate `index`'s turn, [begin, end) in Unix milliseconds: starts_at_ms + index * d / n with
/// d = duration_s (ms) and n candidates.
void shadow_state_turn(const ShadowState& state, size_t index, int64_t* begin_ms, int64_t* end_ms);

/// The candidate whose turn holds `now_ms`, or -1 before the first turn and -2 after the last.
int32_t shadow_state_candidate_at(const ShadowState& state, int64_t now_ms);

}  // namespace edgesmith
