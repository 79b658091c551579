// Link-time stand-in for the wheel's libonnxruntime.so.<version>, never installed or loaded.
//
// The wheel's library carries the SONAME libonnxruntime.so.1, but the wheel ships the file only as
// libonnxruntime.so.<version> (no libonnxruntime.so.1 beside it), so a plugin linked against it
// directly would ask the loader for a file that does not exist. Linking against this stub, whose
// SONAME is the wheel's file name, makes the plugin ask for that file instead; the plugin's RUNPATH
// finds the real one. The plugin calls no other ORT symbol: everything goes through the OrtApi table.
extern "C" __attribute__((visibility("default"))) const void* OrtGetApiBase() { return nullptr; }
