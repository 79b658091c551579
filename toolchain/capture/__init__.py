"""Capture, central side (docs/capture.md): the signed capture states (``capture start|stop|upload``),
the HTTP(S) receiver devices upload samples to, and the content-addressed sample store it fills.
The device side (sampling, the bounded on-disk store, upload) is the C++ agent's."""
