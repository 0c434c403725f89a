"""The block server: budget.py, selection.py, host.py, announce.py, serve.py (see swarm/__init__.py)."""
