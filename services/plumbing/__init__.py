"""Server plumbing of all three services: settings, logs, metrics, the one interceptor, request
limits, protobuf conversions, start-up, health and shutdown."""
