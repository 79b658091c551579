#pragma once
// Which URLs may carry a secret (a bearer token) from a device: the rule the agent applies to a
// capture state's upload_url, bound into Python (edgesmith.runtime.url_https_or_loopback) for the
// central side's own refusal, so both refuse the same URLs.
#include <string>

namespace edgesmith {

/// https://, or http:// to this host's loopback (127.0.0.0/8, [::1], localhost), where the secret
/// never leaves the machine. Anything else (other schemes, user info, other hosts) is not.
bool url_https_or_loopback(const std::string& url);

}  // namespace edgesmith
