/* libedgesmith_backend_testabi1.so / _testabi3.so: plugins built for another plugin ABI than the
 * runtime's. Their base says they speak TESTABI_OLDEST to TESTABI_NEWEST and get_api answers NULL
 * for any other version, so the loader must refuse them naming both versions.
 * libedgesmith_backend_testhollow.so (TESTABI_HOLLOW): speaks the runtime's version but its table
 * has no functions, which the loader must refuse too. Written in C99 with -pedantic, which also
 * checks that runtime/plugin_api.h is a C header. */
#include <stddef.h>

#include "runtime/plugin_api.h"

#ifndef TESTABI_OLDEST
#error "define TESTABI_OLDEST and TESTABI_NEWEST"
#endif

#ifdef TESTABI_HOLLOW
static const EdgesmithPluginApi testabi_api = {sizeof(EdgesmithPluginApi), EDGESMITH_PLUGIN_API_VERSION,
                                               "testecho", NULL, NULL, NULL, NULL, NULL, NULL, NULL};
#endif

static const EdgesmithPluginApi* testabi_get_api(uint32_t version) {
#ifdef TESTABI_HOLLOW
  return version == EDGESMITH_PLUGIN_API_VERSION ? &testabi_api : NULL;
#else
  (void)version;
  return NULL;
#endif
}

static const EdgesmithPluginBase testabi_base = {TESTABI_OLDEST, TESTABI_NEWEST, testabi_get_api};

const EdgesmithPluginBase* edgesmith_plugin_base(void) { return &testabi_base; }
