// Small string helpers shared by the core: hex coding and quoting untrusted text in messages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace edgesmith {

/// Lower-case hex of `size` bytes.
std::string hex_encode(const uint8_t* data, size_t size);

/// True when `text` is exactly `length` lower-case hex characters.
bool hex_is_lower(const std::string& text, size_t length);

/// Decode hex (either case) into bytes; returns false (and leaves `out` unspecified) on odd
/// length or a non-hex character.
bool hex_decode(const std::string& text, std::vector<uint8_t>* out);

/// Quote untrusted text for an error message: printable ASCII is kept, anything else becomes
/// \xNN, and text longer than `max_chars` is cut with "...". The result is always valid UTF-8.
std::string string_quote(const std::string& text, size_t max_chars = 80);

/// The first `n` characters of a hex digest followed by an ellipsis, as the docs show them.
std::string hex_abbrev(const std::string& hex, size_t n = 12);

}  // namespace edgesmith
