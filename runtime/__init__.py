"""edgesmith.runtime: everything that runs on a device (artifact checks, sessions, telemetry)."""
