"""The fleet, central side: the MQTT broker edgesmith runs, the telemetry protocol, and the monitor."""
