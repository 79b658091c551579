"""Deployment, central side (docs/deployment.md): archive and serve artifacts, sign desired
states, roll them out in waves over the fleet's broker, abort and roll back."""
