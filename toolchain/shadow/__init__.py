"""Shadow evaluation, the central side (docs/shadow.md): ``edgesmith shadow start|stop|report``,
``edgesmith select --from-shadow`` and ``edgesmith deploy --require-shadow``.

The store's shadow tables, and ingest's record of ``shadow`` messages and ``shadow.*`` events, are
toolchain/fleet/store/shadows.py; ``central`` signs and publishes shadow states; ``results`` turns
the stored windows into per device x candidate figures, a measured selection, and the deploy gate;
``lineage`` logs a selection to MLflow."""
