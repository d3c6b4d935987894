"""medvlm serving processes: a vision encoder, a text encoder and a gateway."""
