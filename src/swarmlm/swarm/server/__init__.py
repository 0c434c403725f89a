"""The block server: budget.py, saved.py, selection.py, chain.py, checks.py, spans.py, host.py, announce.py, serve.py (see swarm/__init__.py)."""
