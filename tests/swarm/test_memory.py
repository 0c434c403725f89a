"""`serve --max-memory`: the plan (pure), its errors, and a served process that stays under its bound."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swarmlm.cli import main
from swarmlm.errors import UserError
from swarmlm.model.config import PRESETS
from swarmlm.model.generate import generate
from swarmlm.model.hf import save_model
from swarmlm.model.quant import quantize_model
from swarmlm.model.transformer import Transformer
from swarmlm.swarm.client.model import RemoteModel
from swarmlm.swarm.server.budget import BudgetLimits
from swarmlm.swarm.server.memory import MIN_CACHE_TOKENS, parse_size, plan_memory
from tests.helpers.swarm import poll_until
from tests.helpers.swarm_servers import ServerProcesses, local_model

MB = 1 << 20
SIZES = dict(block_bytes=10 * MB, load_bytes=20 * MB, kv_bytes_per_token=4096, scratch_bytes_per_token=1000,
             attn_bytes_per_token_pair=0, n_layers=8)


def test_sizes_parse_in_the_usual_spellings():
    assert parse_size("512MB") == 512 * 10 ** 6 and parse_size("512M") == parse_size("512mib") == 512 * MB
    assert parse_size("1.5GiB") == 3 * (1 << 29) and parse_size("4096") == 4096
    for bad in ("", "lots", "12 parsecs", "-5MB", "0"):
        with pytest.raises(UserError, match="--max-memory"):
            parse_size(bad)


def test_plan_takes_as_many_blocks_as_fit_then_caps_the_cache():
    limits = BudgetLimits()
    fixed = 100 * MB + 20 * MB + 1024 * 1000
    # room for 5 blocks with MIN_CACHE_TOKENS each, not 6
    room = 5 * (10 * MB + MIN_CACHE_TOKENS * 4096) + MB
    plan = plan_memory(fixed + room, overhead_bytes=100 * MB, want_blocks=None, limits=limits, **SIZES)
    assert plan.n_blocks == 5
    assert MIN_CACHE_TOKENS <= plan.limits.max_cache_tokens < limits.max_cache_tokens
    assert plan.weights_bytes + plan.cache_bytes + plan.fixed_bytes <= fixed + room
    assert plan.limits.max_kept_bytes == 0 and plan.limits.max_request_tokens == 1024
    assert plan_memory(fixed + room, overhead_bytes=100 * MB, want_blocks=2, limits=limits, **SIZES).n_blocks == 2
    big = plan_memory(1 << 40, overhead_bytes=100 * MB, want_blocks=None, limits=limits, **SIZES)
    assert big.n_blocks == 8 and big.limits.max_cache_tokens == limits.max_cache_tokens


def test_too_small_for_one_block_is_one_line():
    with pytest.raises(UserError, match=r"--max-memory 120 MiB is too small for one block: it needs about 135 MiB \(100 MiB for the process"):
        plan_memory(120 * MB, overhead_bytes=100 * MB, want_blocks=None, limits=BudgetLimits(), **SIZES)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small")
    cfg = PRESETS["small"].replace(eos_token_id=None)
    torch.manual_seed(0)
    save_model(Transformer(cfg), cfg, directory)
    return directory


def test_serve_refuses_a_bound_below_one_block_in_one_line(small_dir, capsys):
    assert main(["serve", str(small_dir), "--max-memory", "300MB", "--blocks", "0:8", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is too small for one block" in err and len(err.splitlines()) == 1
    assert main(["serve", str(small_dir), "--max-memory", "half"]) == 2
    assert "--max-memory must look like 512MB" in capsys.readouterr().err


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_512mb_server_serves_small_in_int4_and_stays_under_its_bound(tmp_path, small_dir):
    procs = ServerProcesses(tmp_path)
    try:
        server = procs.start(small_dir, extra_args=["--max-memory", "512MB", "--quantize", "int4"])
        with RemoteModel.connect(str(small_dir), initial_peers=server.maddrs, quantization="int4") as model:
            tokens = model.generate([5, 17, 42, 99], max_new_tokens=24)
            chain = model.last_session.chain
            with model.inference_session(batch=2, max_length=500) as session:   # a long prefill, a big cache
                session.step(torch.randn(2, 400, 512))
                session.step(torch.randn(2, 1, 512))
        assert chain[0].start == 0 and chain[-1].end == 8 and len(chain) == 1
        assert tokens == generate(quantize_model(local_model(small_dir), "int4"), [5, 17, 42, 99], max_new_tokens=24)
        peak = _hwm(server.proc.pid)
        print(f"server peak RSS {peak / 1e6:.0f} MB")
        assert peak < 512 * 10 ** 6, f"peak RSS {peak / 1e6:.0f} MB"
    finally:
        procs.close()
