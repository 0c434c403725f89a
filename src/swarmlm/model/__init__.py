"""The Transformer and everything that touches it directly, in reading order:

- config.py       ModelConfig (frozen), PRESETS ("tiny", "small")
- layers.py       RMSNorm, Rotary / rope_inv_freq / apply_rope, Attention, MLP
- block.py        Block: one pre-norm layer
- cache.py        KVCache: caller-owned key/value buffers for a span of blocks
- transformer.py  Transformer: embed / run_blocks / head, any part may be absent
- tokenizer.py    Tokenizer: byte-level BPE over `tokenizers`
- hf.py           load_model / load_config / save_model: HF checkpoint directories
- generate.py     sample_next, generate, stream_generate, generate_from_args (the CLI)

Knows nothing of networks or parallelism; parallel/ and swarm/ wrap these objects from outside.
"""
