"""The swarm client: routing.py, session.py (with chained.py), remote.py, model.py (see swarm/__init__.py)."""
