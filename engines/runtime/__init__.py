"""Serving half of engines/: bundle loading and engines. Never imports torch or engines.build."""
