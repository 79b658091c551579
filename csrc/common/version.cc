#include "common/version.h"

#ifndef EDGESMITH_VERSION
#define EDGESMITH_VERSION "0.0.0+unknown"
#endif

namespace edgesmith {

const char* version_string() { return EDGESMITH_VERSION; }

}  // namespace edgesmith
