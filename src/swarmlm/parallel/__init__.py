"""In-cluster parallel training on torch.distributed, applied to a built model from outside.

In reading order:

- mesh.py        ParallelPlan (degrees per technique), check_plan (refuses bad plans before
                 launch), split_layers, Mesh / build_mesh (the named device mesh)
- ddp.py         apply_ddp: data parallel with DistributedDataParallel
- fsdp.py        apply_fsdp: FSDP2 fully_shard per block (ZeRO-3 / HSDP), mixed precision
- tp.py          apply_tp: Megatron column/row splits with DTensor, sequence parallel norms
- pp.py          cut_stage, Pipeline (GPipe, 1F1B, interleaved 1F1B), tied-embedding sync
- cp.py          ring_attention (P2P ring, online softmax, causal, backward), apply_cp,
                 cp_context (torch's own context parallel on CUDA)
- materialize.py build_shell (the model on the meta device), materialize (allocate only this
                 rank's pieces, filled with the single-process initial weights)
- engine.py      ParallelTrainer: applies a plan, runs one optimizer step on a global batch
- checkpoint.py  save_checkpoint / load_checkpoint (DCP, any layout to any layout), export_hf
- launch.py      run_parallel_training: `swarmlm train` under torchrun

Knows the model only through its module names (layers, attention.q_proj, ...); model/ knows
nothing of this package.
"""
