"""Development tools, never shipped in an image: the local stack launcher and the local CA."""
