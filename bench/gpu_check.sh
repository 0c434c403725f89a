#!/usr/bin/env bash
# GPU check for swarmlm.parallel (not part of the tests): FSDP2 with bf16 mixed precision and
# torch's own context parallel on CUDA, each against the same run in one process.
# Uses 2 processes if 2 GPUs are visible, else 1 (then only the single-rank paths run).
# Prints one JSON line per check; exits non-zero if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then echo '{"name": "gpu_check", "value": "skipped: no CUDA device"}'; exit 0; fi
N=$(( NGPU >= 2 ? 2 : 1 ))
cat > /tmp/swarmlm_gpu_check.py <<'PYEOF'
import dataclasses, json, os, sys
import torch, torch.distributed as dist
from swarmlm.model.config import PRESETS
from swarmlm.parallel.engine import ParallelTrainer
from swarmlm.parallel.mesh import ParallelPlan, build_mesh, check_plan
from swarmlm.train.config import TrainConfig

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
dev = torch.device("cuda", torch.cuda.current_device())
cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=512)
train = TrainConfig(steps=10, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=2)

def batch(s):
    g = torch.Generator().manual_seed(1000 + s)
    seq = torch.randint(cfg.vocab_size, (train.batch_size, train.seq_len + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]

ref_tr = ParallelTrainer(cfg, train, device=dev)   # every rank: the one-process run, float32
ref = [ref_tr.step(s, *batch(s)) for s in range(10)]
del ref_tr
checks = [("fsdp_bf16", dict(fsdp=world), torch.bfloat16, 5e-2), ("cp_torch", dict(cp=world), None, 1e-3)]
ok = True
for name, kw, dtype, tol in checks:
    plan = check_plan(cfg, world, ParallelPlan(**kw), seq_len=train.seq_len, batch_size=train.batch_size,
                      cp_chunks_per_rank=2)
    tr = ParallelTrainer(cfg, train, plan, mesh=build_mesh(plan, "cuda"), device=dev, param_dtype=dtype)
    losses = [tr.step(s, *batch(s)) for s in range(10)]
    err = max(abs(a - b) for a, b in zip(losses, ref))
    ok &= err < tol
    if rank == 0:
        print(json.dumps({"name": f"gpu_check.{name}", "value": err, "unit": "max |loss - one process|",
                          "tolerance": tol, "world": world, "pass": err < tol,
                          "peak_mem_bytes": torch.cuda.max_memory_allocated()}), flush=True)
dist.destroy_process_group()
sys.exit(0 if ok else 1)
PYEOF
$PY -m torch.distributed.run --nproc-per-node "$N" --master-addr 127.0.0.1 --master-port "${PORT:-29533}" \
    /tmp/swarmlm_gpu_check.py
