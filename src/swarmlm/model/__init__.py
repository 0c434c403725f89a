"""The Transformer and everything that touches it directly, in reading order:

- config.py       ModelConfig (frozen), PRESETS ("tiny", "small")
- layers.py       RMSNorm, Rotary / rope_inv_freq / apply_rope, Attention, MLP
- block.py        Block: one pre-norm layer
- cache.py        KVCache: caller-owned key/value buffers for a span of blocks
- transformer.py  Transformer: embed / run_blocks / head, any part may be absent
- tokenizer.py    Tokenizer: byte-level BPE over `tokenizers`
- hf.py           load_model / load_config / save_model: HF checkpoint directories
- generate.py     sample_next, generate, stream_generate, generate_from_args (the CLI)
- fastdecode.py   DecodeStep, span_step: the lean one-token decode step
- quant.py        QuantScheme, QuantLinear, quantize_model: int8 / int4 weights
- qkernels.py     quantized one-row products: the torch reference and the AVX512-VNNI extension (csrc/qgemv.cpp)
- t5.py           T5Config, T5 (encoder-decoder), T5Cache, relative_bucket, t5_loss, PRESETS ("t5-tiny")
- t5_hf.py        load_t5 / load_t5_config / save_t5: HF T5ForConditionalGeneration directories
- t5_generate.py  generate_t5, stream_t5, t5_generate_from_args (the CLI for T5 checkpoints)

Knows nothing of networks or parallelism; parallel/ and swarm/ wrap these objects from outside.
"""
