"""Small plain-PyTorch models shipped with edgesmith for demos and tests (seeded, no downloads)."""
