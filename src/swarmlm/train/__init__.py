"""Single-process training: configs, the optimizer and its schedule, the loop.

- config.py: `TrainConfig`, `RunConfig`, the presets, `load_run_config` (a preset name or a TOML file).
- optim.py: `build_optimizer` (AdamW), `lr_at` (warmup + cosine as a function of the step), `set_lr`.
- loop.py: `prepare_data`, `lm_loss`, `evaluate` (which torchrun and the swarm reuse), `train`,
  checkpoints with exact resume, `train_from_args` (`swarmlm train` in one process).
- t5_loop.py: `span_corrupt`, `train_t5`, `train_t5_from_args`: T5 presets on span corruption.

Reads corpora and shards from data/ and the model from model/; knows nothing of torchrun or the
swarm: cli.py chooses between this loop, parallel/ and collab/.
"""
