"""The swarm client: routing.py, states.py, hops.py, chained.py, session.py, remote.py, model.py (see swarm/__init__.py)."""
