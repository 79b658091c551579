/* libedgesmith_backend_testabi1.so / _testabi3.so: plugins built for another plugin ABI than the
 * runtime's. Their base says they speak TESTABI_OLDEST to TESTABI_NEWEST and get_api answers NULL
 * for any other version, so the loader must refuse them naming both versions. Written in C99 with
 * -pedantic, which also checks that runtime/plugin_api.h is a C header. */
#include <stddef.h>

#include "runtime/plugin_api.h"

#ifndef TESTABI_OLDEST
#error "define TESTABI_OLDEST and TESTABI_NEWEST"
#endif

static const EdgesmithPluginApi* testabi_get_api(uint32_t version) {
  (void)version;
  return NULL;
}

static const EdgesmithPluginBase testabi_base = {TESTABI_OLDEST, TESTABI_NEWEST, testabi_get_api};

const EdgesmithPluginBase* edgesmith_plugin_base(void) { return &testabi_base; }
