"""Serving half of engines/: bundle loading and engines. Never imports torch or the build half,
whose engines (the torch reference) plug in through engines.runtime.select.register_engine."""
