"""Example apps built on flask-scoria."""
