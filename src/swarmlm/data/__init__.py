"""Corpora and token shards.

- corpus.py: `Corpus`, `open_corpus` (the stdlib default, a directory, or a file), the split by file.
- shards.py: `load_or_train_tokenizer`, `prepare_tokens` → `TokenShards` (memory-mapped, cached),
  `Batches` (windows as a pure function of seed and step), `eval_windows`.
"""
