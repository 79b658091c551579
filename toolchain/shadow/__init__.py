"""Shadow evaluation, the central side (docs/shadow.md): ``edgesmith shadow start|stop|report``,
``edgesmith select --from-shadow`` and ``edgesmith deploy --require-shadow``.

``tables`` holds the store's shadow tables and the monitor's ingest of ``shadow`` messages and
``shadow.*`` events; ``central`` signs and publishes shadow states; ``results`` turns the stored
windows into per device x candidate figures, a measured selection, and the deploy gate."""
