"""`swarmlm ledger ...`, and the ledger wiring of `serve --ledger` and `generate --swarm --ledger`.

Each command is one function of the parsed arguments that prints its result (the contract address
last for `deploy`; one JSON object for `status --json`). A peer's account is the ledger key in its
data dir (`--data-dir`, default `$SWARMLM_HOME`). Knows nothing of the swarm's wire or tensors.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
from pathlib import Path
from typing import Any

from swarmlm.errors import LedgerError, UserError
from swarmlm.ledger import chain as chainlib
from swarmlm.ledger import keys, receipts

DEV_FUNDS = 100 * 10 ** 18


def _client(args: Any) -> chainlib.LedgerClient:
    if not getattr(args, "ledger", None):
        raise UserError("--ledger ADDRESS is needed (printed by `swarmlm ledger deploy`)")
    return chainlib.LedgerClient(chainlib.connect(args.chain_rpc), args.ledger, keys.load_or_create_key(args.data_dir))


def chain_from_args(args: Any) -> int:
    from swarmlm.ledger.node import serve

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(url: str) -> None:
            print(url, flush=True)

        await serve(args.host, args.port, on_ready=ready, stop=stop)

    asyncio.run(main())
    return 0


def fund(chain_rpc: str, data_dir: Any) -> str:
    """Dev chains only (anvil, `ledger chain`): top the data dir's account up to 100 ether; the account."""
    w3 = chainlib.connect(chain_rpc)
    account = receipts.address_of(keys.load_or_create_key(data_dir))
    try:
        w3.provider.make_request("anvil_setBalance", [account, hex(DEV_FUNDS)])
    except Exception as e:
        raise LedgerError(f"{chain_rpc} is not a dev chain that funds accounts: {e}") from None
    return account


def fund_from_args(args: Any) -> int:
    print(fund(args.chain_rpc, args.data_dir))
    return 0


def deploy_from_args(args: Any) -> int:
    params = chainlib.LedgerParams(epoch_seconds=args.epoch_seconds, free_tokens=args.free_tokens, slots=args.slots,
                                   price_per_token=args.price, quota_per_credit=args.quota_per_credit,
                                   sample_credit=args.sample_credit, dispute_seconds=args.dispute_seconds)
    if not 0 <= params.slots <= 8 or params.epoch_seconds < 2:
        raise UserError("--slots is 0..8 and --epoch-seconds at least 2")
    w3 = chainlib.connect(args.chain_rpc)
    print(chainlib.deploy(w3, keys.load_or_create_key(args.data_dir), params))
    return 0


def register(c: chainlib.LedgerClient, data_dir: Any, *, server: bool) -> str:
    """Bind `c`'s account to the swarm peer of `data_dir` (its peer key signs); that peer's ID."""
    identity = keys.identity_of(data_dir)
    peer_key, sig = keys.sign_binding(identity, c.chain_id, c.address, c.account)
    c.transact("register", peer_key, sig, server)
    return identity.peer_id


def register_from_args(args: Any) -> int:
    c = _client(args)
    peer_id = register(c, args.data_dir, server=bool(args.server))
    print(f"{c.account} registered as peer {peer_id}{' (server)' if args.server else ''}")
    return 0


def status(c: chainlib.LedgerClient, account: str) -> dict:
    epoch = c.call("current_epoch")
    now = c.w3.eth.get_block("latest")["timestamp"]
    peer_key = c.call("peer_key_of", account)
    return {"ledger": c.address, "chain_id": c.chain_id, "account": account, "epoch": epoch,
            "renews_in_s": c.call("epoch_start", epoch + 1) - now, "epoch_seconds": c.call("epoch_seconds"),
            "registered": peer_key != bytes(32), "server": c.call("is_server", account),
            "servers": c.call("servers_in", epoch),
            "credit": c.call("credit_of", account, epoch),
            "credit_last_epoch": c.call("credit_of", account, epoch - 1) if epoch else 0,
            "quota": c.call("quota", account, epoch), "quota_left": c.call("quota_left", account, epoch),
            "deposit": c.call("deposit_of", account), "unlocking": c.call("unlocking_of", account),
            "balance": c.call("balance_of", account), "slot_holder": c.call("slot_holder", epoch, account),
            "free_tokens": c.call("free_tokens"), "price_per_token": c.call("price_per_token")}


def status_from_args(args: Any) -> int:
    c = _client(args)
    s = status(c, args.account or c.account)
    if args.json:
        print(json.dumps(s))
    else:
        for k, v in s.items():
            print(f"{k}: {v}")
    return 0


def deposit_from_args(args: Any) -> int:
    c = _client(args)
    if args.amount <= 0:
        raise UserError("--amount must be positive (wei)")
    c.transact("deposit", value=args.amount)
    print(f"deposited {args.amount} wei; deposit now {c.call('deposit_of', c.account)}")
    return 0


def _bids_path(args: Any, c: chainlib.LedgerClient) -> Path:
    return keys.data_dir_of(args.data_dir) / "ledger" / f"bids-{c.address.lower()}.json"


def bid_from_args(args: Any) -> int:
    c = _client(args)
    escrow = args.escrow if args.escrow is not None else args.amount
    if args.amount <= 0 or escrow < args.amount:
        raise UserError("--amount must be positive and --escrow at least --amount")
    target = args.epoch if args.epoch is not None else c.call("current_epoch") + 1
    salt = secrets.token_bytes(32)
    path = _bids_path(args, c)
    bids = json.loads(path.read_text()) if path.exists() else {}
    bids[str(target)] = {"amount": args.amount, "salt": salt.hex()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(bids))
    c.transact("commit", target, c.call("seal", c.account, target, args.amount, salt), value=escrow)
    tmp.replace(path)                 # kept only once the commit is on chain
    print(f"sealed bid for epoch {target} committed (escrow {escrow} wei)")
    return 0


def reveal_from_args(args: Any) -> int:
    c = _client(args)
    target = args.epoch if args.epoch is not None else c.call("current_epoch") + 1
    path = _bids_path(args, c)
    bids = json.loads(path.read_text()) if path.exists() else {}
    if str(target) not in bids:
        raise UserError(f"no bid of this account for epoch {target} in {path}")
    bid = bids[str(target)]
    c.transact("reveal", target, bid["amount"], bytes.fromhex(bid["salt"]))
    print(f"bid of {bid['amount']} wei for epoch {target} revealed")
    return 0


def settle_from_args(args: Any) -> int:
    c = _client(args)
    if args.auction is not None:
        c.transact("settle_auction", args.auction)
        print(f"auction for epoch {args.auction} settled at {c.call('auction_price', args.auction)} wei")
        return 0
    from swarmlm.ledger.policy import Gate
    done = Gate(c, keys.data_dir_of(args.data_dir)).settle(current_too=args.now)
    for epoch, account, tokens in done:
        print(f"settled epoch {epoch} with {account}: {tokens} tokens")
    print(f"{len(done)} channel(s) settled")
    return 0


def withdraw_from_args(args: Any) -> int:
    c = _client(args)
    path = _bids_path(args, c)
    for target in (json.loads(path.read_text()) if path.exists() else {}):
        if c.call("auction_done", int(target)) and c.call("escrow_of", int(target), c.account):
            c.transact("claim_refund", int(target))
    if args.unlock:
        c.transact("unlock", args.unlock)
        print(f"{args.unlock} wei unlocking; withdrawable from epoch {c.call('unlock_epoch_of', c.account)}")
    if c.call("balance_of", c.account) or (c.call("unlocking_of", c.account)
                                           and c.call("current_epoch") >= c.call("unlock_epoch_of", c.account)):
        c.transact("withdraw")
        print("withdrawn")
    else:
        print("nothing to withdraw yet")
    return 0


def round_from_args(args: Any) -> int:
    """Co-sign a training round's record (a JSON file: run, round, epoch, members, samples) as the data
    dir's account, and with `--submit` record it on chain once every member has signed it."""
    c = _client(args)
    path = Path(args.file)
    try:
        record = json.loads(path.read_text())
        if not isinstance(record["run"], str):
            raise TypeError("run is a name")
        members = [receipts.checksum(m) for m in record["members"]]
        samples = [int(x) for x in record["samples"]]
        epoch, round_ = int(record["epoch"]), int(record["round"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a round record with run, round, epoch, members, samples ({e})") from None
    if len(members) != len(samples) or members != sorted(members, key=lambda m: int(m, 16)):
        raise UserError(f"{path}: members, in ascending order, each with its samples")
    run = receipts.run_tag(record["run"])
    digest = receipts.round_digest(c.domain, run, round_, epoch, members, samples)
    sigs = record.setdefault("signatures", {})
    if c.account in members and c.account not in sigs:
        sigs[c.account] = receipts.sign_digest(c.key, digest).hex()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
        print(f"signed by {c.account}")
    if args.submit:
        missing = [m for m in members if m not in sigs]
        if missing:
            raise UserError(f"{path}: not yet signed by {', '.join(missing)}")
        parts = [receipts.split_signature(bytes.fromhex(sigs[m])) for m in members]
        c.transact("record_round", run, round_, epoch, members, samples,
                   [v for v, _, _ in parts], [r for _, r, _ in parts], [s for _, _, s in parts])
        print(f"round {round_} of {record['run']} recorded: {sum(samples)} samples credited in epoch {epoch}")
    return 0


def advance(chain_rpc: str, seconds: int) -> int:
    """Dev chains only: move the chain's clock forward `seconds` (evm_increaseTime, then a block); its time."""
    w3 = chainlib.connect(chain_rpc)
    try:
        w3.provider.make_request("evm_increaseTime", [hex(seconds)])
        w3.provider.make_request("evm_mine", [])
    except Exception as e:
        raise LedgerError(f"{chain_rpc} is not a dev chain: {e}") from None
    return w3.eth.get_block("latest")["timestamp"]


def advance_from_args(args: Any) -> int:
    print(advance(args.chain_rpc, args.seconds))
    return 0


# ---- wiring for serve and generate ---------------------------------------------------------------

def gate_from_args(args: Any) -> Any:
    """The admission policy of `serve --ledger ADDR --chain-rpc URL` for the server's data dir."""
    from swarmlm.ledger.policy import Gate
    c = _client(args)
    if not c.call("is_server", c.account):
        raise UserError(f"this server's ledger account {c.account} is not registered as a server: run "
                        f"`swarmlm ledger register --server --ledger {c.address} --chain-rpc URL "
                        f"--data-dir {args.data_dir or '$SWARMLM_HOME'}` first")
    return Gate(c, keys.data_dir_of(args.data_dir))


def round_book_from_args(args: Any) -> Any:
    """What `train --swarm --ledger ADDR` signs training rounds with: the data dir's account (registered,
    bound to the data dir's peer, on first use). Without --data-dir the peer's identity too is taken from
    $SWARMLM_HOME (args.data_dir is set), so the account and the peer ID it is bound to stay together."""
    from swarmlm.ledger.rounds import RoundBook
    if args.data_dir is None:
        args.data_dir = str(keys.data_dir_of(None))
    return RoundBook.open(_client(args), args.data_dir)


def payer_from_args(args: Any) -> Any:
    """The receipts a `generate --swarm --ledger` client signs, with the account in `$SWARMLM_HOME`."""
    from swarmlm.ledger.payer import Payer
    c = chainlib.LedgerClient(chainlib.connect(args.chain_rpc), args.ledger, keys.load_or_create_key(None))
    return Payer(c, keys.data_dir_of(None), new_tokens=getattr(args, "max_new_tokens", 1))
