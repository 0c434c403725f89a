"""swarmlm: train, store and serve a language model across machines that do not trust each other.

Layers (imports point down): cli.py/demo ← swarm, collab ← store ← p2p ← parallel ← train, data ← model;
errors.py, serialize.py (with compact.py, the fixed layout of a decoding step's messages), log.py and
base58.py (peer IDs and CIDv0s) are leaves. See DESIGN.md.
"""

__version__ = "0.1.0"
