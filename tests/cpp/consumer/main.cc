// edgesmith_consumer ARTIFACT_DIR PUBLIC_KEY.pub: verify an artifact with the installed core.
// Exit 0 and one line describing the artifact when it verifies; exit 1 and the core's error
// otherwise.
#include <edgesmith/artifact/keys.h>
#include <edgesmith/artifact/verify.h>
#include <edgesmith/common/error.h>
#include <edgesmith/common/version.h>
#include <edgesmith/runtime/session.h>  // not used: checks the installed headers are complete

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: edgesmith_consumer ARTIFACT_DIR PUBLIC_KEY.pub\n";
    return 2;
  }
  try {
    const edgesmith::VerifyResult result =
        edgesmith::artifact_verify(argv[1], {edgesmith::public_key_read(argv[2])});
    std::cout << "verified " << result.manifest.name << " for " << result.manifest.target_name
              << " (" << result.manifest.backend_name << "), " << result.file_count
              << " files, key " << result.key_id << ", edgesmith " << edgesmith::version_string()
              << "\n";
    return 0;
  } catch (const edgesmith::Error& error) {
    std::cerr << edgesmith::error_code_name(error.code()) << ": " << error.what() << "\n";
    return 1;
  }
}
