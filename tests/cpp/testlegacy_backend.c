/* libedgesmith_backend_testlegacy.so: a plugin of plugin ABI 1, which exported a C++ factory
 * (edgesmith_backend_open_v1) and its formats under extern "C" names and nothing else. The runtime
 * must refuse it as ABI 1 without calling either. */
#include <stddef.h>

__attribute__((visibility("default"))) void* edgesmith_backend_open_v1(const void* args, void* status) {
  (void)args;
  (void)status;
  return NULL;
}

__attribute__((visibility("default"))) const char* edgesmith_backend_formats_v1(void) {
  return "testecho";
}
