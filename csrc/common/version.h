#pragma once

namespace edgesmith {

/// The edgesmith version this core was built as (the Python package's version).
const char* version_string();

}  // namespace edgesmith
