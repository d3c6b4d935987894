"""Model engines: the build half (engines.build, needs torch) and the runtime half (engines.runtime)."""
