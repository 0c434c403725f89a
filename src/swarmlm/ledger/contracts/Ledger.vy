# pragma version 0.4.3
# pragma evm-version shanghai
"""
@title swarmlm ledger: fair access to a swarm's model
@notice One contract holds the whole ledger of one swarm:
    registry   each account binds a swarm peer (its Ed25519 public key) once; the peer key's signature
               over the binding is recorded here and checked off chain by every reader (the EVM has no
               Ed25519 precompile); the account's own key signs the registering transaction
    money      deposits (locked, spendable for use), unlocking (two epochs), balances (pull payments)
    epochs     epoch = (block.timestamp - genesis) // epoch_seconds
    channels   one implicit unidirectional channel per (client, server, epoch): the client signs
               cumulative EIP-712 receipts; the server settles the latest once (by the end of the
               next epoch); a client may close with its own figure, which the server disputes with a
               later receipt before the timeout, else anyone finalizes it
    credit     tokens served (settled receipts) and training samples (round records signed by every
               member) earn credit in their epoch; the quota of the next epoch is
               free_tokens + quota_per_credit * credit
    auction    K priority slots per epoch, sealed-bid uniform second price (each winner pays the
               (K+1)-th highest bid): commit and reveal in the epoch before, settle after
"""

MAX_SLOTS: constant(uint256) = 8
MAX_MEMBERS: constant(uint256) = 16
HALF_N: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168

DOMAIN_TYPEHASH: constant(bytes32) = keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
RECEIPT_TYPEHASH: constant(bytes32) = keccak256("Receipt(address client,address server,uint256 epoch,uint256 tokens)")
ROUND_TYPEHASH: constant(bytes32) = keccak256("Round(bytes32 run,uint256 round,uint256 epoch,bytes32 members,bytes32 samples)")

struct Bid:
    bidder: address
    amount: uint256

event Registered:
    account: indexed(address)
    peer_key: bytes32
    server: bool

event Settled:
    client: indexed(address)
    server: indexed(address)
    epoch: uint256
    tokens: uint256
    covered: uint256
    paid: uint256

event Closing:
    client: indexed(address)
    server: indexed(address)
    epoch: uint256
    tokens: uint256
    deadline: uint256

event RoundRecorded:
    digest: bytes32
    epoch: uint256

event AuctionSettled:
    epoch: uint256
    price: uint256
    winners: uint256

owner: public(address)
genesis: public(uint256)
epoch_seconds: public(uint256)
free_tokens: public(uint256)          # quota every registered account gets each epoch
quota_per_credit: public(uint256)     # extra quota per unit of last epoch's credit
sample_credit: public(uint256)        # credit per training sample
price_per_token: public(uint256)      # wei a client pays per token beyond its quota (0: none sold)
slots: public(uint256)                # K priority slots per epoch
dispute_seconds: public(uint256)      # how long a client's close waits for the server's later receipt
domain_separator: public(bytes32)

# registry
peer_key_of: public(HashMap[address, bytes32])
peer_sig_of: public(HashMap[address, Bytes[64]])
account_of: public(HashMap[bytes32, address])
is_server: public(HashMap[address, bool])
server_epoch: public(HashMap[address, uint256])   # the epoch it registered in; it serves from the next
_servers_total: uint256
_servers_before: uint256
_servers_changed: uint256

# money
deposit_of: public(HashMap[address, uint256])
unlocking_of: public(HashMap[address, uint256])
unlock_epoch_of: public(HashMap[address, uint256])
balance_of: public(HashMap[address, uint256])

# accounting, per account and epoch
credit_of: public(HashMap[address, HashMap[uint256, uint256]])
used_of: public(HashMap[address, HashMap[uint256, uint256]])      # quota consumed
spent_of: public(HashMap[address, HashMap[uint256, uint256]])     # tokens paid from the deposit

# channels, by keccak256(client, server, epoch)
settled_tokens: public(HashMap[bytes32, uint256])
channel_done: public(HashMap[bytes32, bool])
closing_tokens: public(HashMap[bytes32, uint256])
closing_deadline: public(HashMap[bytes32, uint256])

# training rounds
round_done: public(HashMap[bytes32, bool])

# auctions, per target epoch
commit_of: public(HashMap[uint256, HashMap[address, bytes32]])
escrow_of: public(HashMap[uint256, HashMap[address, uint256]])
revealed_of: public(HashMap[uint256, HashMap[address, bool]])
top_bids: HashMap[uint256, DynArray[Bid, MAX_SLOTS + 1]]
auction_done: public(HashMap[uint256, bool])
auction_price: public(HashMap[uint256, uint256])
slot_holder: public(HashMap[uint256, HashMap[address, bool]])


@deploy
def __init__(epoch_seconds: uint256, free_tokens: uint256, slots: uint256, price_per_token: uint256,
             quota_per_credit: uint256, sample_credit: uint256, dispute_seconds: uint256):
    assert epoch_seconds >= 2, "epoch too short"
    assert slots <= MAX_SLOTS, "too many slots"
    self.owner = msg.sender
    self.genesis = block.timestamp
    self.epoch_seconds = epoch_seconds
    self.free_tokens = free_tokens
    self.slots = slots
    self.price_per_token = price_per_token
    self.quota_per_credit = quota_per_credit
    self.sample_credit = sample_credit
    self.dispute_seconds = dispute_seconds
    self.domain_separator = keccak256(abi_encode(DOMAIN_TYPEHASH, keccak256("swarmlm-ledger"), keccak256("1"),
                                                 chain.id, self))


# ---- epochs ------------------------------------------------------------------------------------

@view
@external
def current_epoch() -> uint256:
    return self._epoch()


@view
@internal
def _epoch() -> uint256:
    return (block.timestamp - self.genesis) // self.epoch_seconds


@view
@external
def epoch_start(epoch: uint256) -> uint256:
    return self.genesis + epoch * self.epoch_seconds


# ---- registry ----------------------------------------------------------------------------------

@external
def register(peer_key: bytes32, peer_sig: Bytes[64], server: bool):
    assert self.peer_key_of[msg.sender] == empty(bytes32), "account already registered"
    assert peer_key != empty(bytes32), "empty peer key"
    assert self.account_of[peer_key] == empty(address), "peer already bound to an account"
    self.peer_key_of[msg.sender] = peer_key
    self.peer_sig_of[msg.sender] = peer_sig
    self.account_of[peer_key] = msg.sender
    if server:
        e: uint256 = self._epoch()
        if self._servers_changed != e or self._servers_total == 0:
            self._servers_before = self._servers_total
            self._servers_changed = e
        self._servers_total += 1
        self.is_server[msg.sender] = True
        self.server_epoch[msg.sender] = e
    log Registered(account=msg.sender, peer_key=peer_key, server=server)


@view
@external
def servers_in(epoch: uint256) -> uint256:
    """Servers registered before `epoch` (exact for the current epoch and later)."""
    if epoch > self._servers_changed:
        return self._servers_total
    return self._servers_before


# ---- money -------------------------------------------------------------------------------------

@external
@payable
def deposit():
    assert msg.value > 0, "nothing deposited"
    self.deposit_of[msg.sender] += msg.value


@external
def unlock(amount: uint256):
    """Start taking `amount` out of the deposit: withdrawable two epochs on, chargeable until then."""
    assert amount > 0 and amount <= self.deposit_of[msg.sender], "not that much deposited"
    self.deposit_of[msg.sender] -= amount
    self.unlocking_of[msg.sender] += amount
    self.unlock_epoch_of[msg.sender] = self._epoch() + 2


@external
def withdraw() -> uint256:
    """Pull what is owed to the caller: its balance, and its unlocked deposit once released."""
    amount: uint256 = self.balance_of[msg.sender]
    self.balance_of[msg.sender] = 0
    if self.unlocking_of[msg.sender] > 0 and self._epoch() >= self.unlock_epoch_of[msg.sender]:
        amount += self.unlocking_of[msg.sender]
        self.unlocking_of[msg.sender] = 0
    assert amount > 0, "nothing to withdraw"
    send(msg.sender, amount)
    return amount


# ---- quota -------------------------------------------------------------------------------------

@view
@internal
def _quota(account: address, epoch: uint256) -> uint256:
    if self.peer_key_of[account] == empty(bytes32):
        return 0
    q: uint256 = self.free_tokens
    if epoch > 0:
        q += self.quota_per_credit * self.credit_of[account][epoch - 1]
    return q


@view
@external
def quota(account: address, epoch: uint256) -> uint256:
    return self._quota(account, epoch)


@view
@external
def quota_left(account: address, epoch: uint256) -> uint256:
    q: uint256 = self._quota(account, epoch)
    return q - min(q, self.used_of[account][epoch])


# ---- channels ----------------------------------------------------------------------------------

@pure
@external
def channel_id(client: address, server: address, epoch: uint256) -> bytes32:
    return keccak256(abi_encode(client, server, epoch))


@view
@external
def receipt_digest(client: address, server: address, epoch: uint256, tokens: uint256) -> bytes32:
    return self._receipt_digest(client, server, epoch, tokens)


@view
@internal
def _receipt_digest(client: address, server: address, epoch: uint256, tokens: uint256) -> bytes32:
    h: bytes32 = keccak256(abi_encode(RECEIPT_TYPEHASH, client, server, epoch, tokens))
    return keccak256(concat(b"\x19\x01", self.domain_separator, h))


@pure
@internal
def _signer(digest: bytes32, v: uint8, r: bytes32, s: bytes32) -> address:
    assert convert(s, uint256) <= HALF_N, "malleable signature"
    signer: address = ecrecover(digest, v, r, s)
    assert signer != empty(address), "bad signature"
    return signer


@internal
def _apply(client: address, server: address, epoch: uint256, tokens: uint256):
    """Charge `client` for `tokens` served in `epoch`: its quota first, then its deposit; credit the server."""
    q: uint256 = self._quota(client, epoch)
    used: uint256 = self.used_of[client][epoch]
    free_left: uint256 = q - min(q, used)
    from_quota: uint256 = min(tokens, free_left)
    self.used_of[client][epoch] = used + from_quota
    paid_tokens: uint256 = 0
    pay: uint256 = 0
    price: uint256 = self.price_per_token
    if tokens > from_quota and price > 0:
        held: uint256 = self.deposit_of[client] + self.unlocking_of[client]
        paid_tokens = min(tokens - from_quota, held // price)
        pay = paid_tokens * price
        from_deposit: uint256 = min(pay, self.deposit_of[client])
        self.deposit_of[client] -= from_deposit
        self.unlocking_of[client] -= pay - from_deposit
        self.balance_of[server] += pay
        self.spent_of[client][epoch] += paid_tokens
    covered: uint256 = from_quota + paid_tokens
    self.credit_of[server][epoch] += covered
    log Settled(client=client, server=server, epoch=epoch, tokens=tokens, covered=covered, paid=pay)


@internal
def _settle(client: address, epoch: uint256, tokens: uint256, v: uint8, r: bytes32, s: bytes32):
    server: address = msg.sender
    assert server != client, "a server cannot serve itself"
    assert self.is_server[server], "not a registered server"
    assert self.server_epoch[server] < epoch, "server registered after that epoch began"
    now: uint256 = self._epoch()
    assert epoch <= now, "epoch not started"
    assert epoch + 1 >= now, "receipt expired"
    assert tokens > 0, "no tokens"
    cid: bytes32 = keccak256(abi_encode(client, server, epoch))
    assert not self.channel_done[cid], "channel already settled"
    assert self._signer(self._receipt_digest(client, server, epoch, tokens), v, r, s) == client, "not signed by the client"
    self.channel_done[cid] = True
    self.settled_tokens[cid] = tokens
    self._apply(client, server, epoch, tokens)


@external
def settle(client: address, epoch: uint256, tokens: uint256, v: uint8, r: bytes32, s: bytes32):
    """The server (msg.sender) settles its channel with `client` for `epoch` with the client's latest
    receipt; once. While a client's close is pending the receipt must be later (a dispute)."""
    cid: bytes32 = keccak256(abi_encode(client, msg.sender, epoch))
    if self.closing_deadline[cid] != 0:
        assert tokens > self.closing_tokens[cid], "not later than the client's close"
        assert block.timestamp < self.closing_deadline[cid], "dispute too late"
    self._settle(client, epoch, tokens, v, r, s)


@external
def dispute(client: address, epoch: uint256, tokens: uint256, v: uint8, r: bytes32, s: bytes32):
    """Answer a client's close with a later receipt; the later receipt wins."""
    cid: bytes32 = keccak256(abi_encode(client, msg.sender, epoch))
    assert self.closing_deadline[cid] != 0, "no close to dispute"
    assert block.timestamp < self.closing_deadline[cid], "dispute too late"
    assert tokens > self.closing_tokens[cid], "not later than the client's close"
    self._settle(client, epoch, tokens, v, r, s)


@external
def close(server: address, epoch: uint256, tokens: uint256):
    """The client (msg.sender) closes its channel with `server` at its own figure, after the epoch."""
    assert self.is_server[server], "not a registered server"
    assert epoch < self._epoch(), "epoch not over"
    cid: bytes32 = keccak256(abi_encode(msg.sender, server, epoch))
    assert not self.channel_done[cid], "channel already settled"
    assert self.closing_deadline[cid] == 0, "already closing"
    self.closing_tokens[cid] = tokens
    self.closing_deadline[cid] = block.timestamp + self.dispute_seconds
    log Closing(client=msg.sender, server=server, epoch=epoch, tokens=tokens,
                deadline=block.timestamp + self.dispute_seconds)


@external
def finalize(client: address, server: address, epoch: uint256):
    """After an undisputed close's timeout, settle the channel at the client's figure (anyone may call)."""
    cid: bytes32 = keccak256(abi_encode(client, server, epoch))
    assert self.closing_deadline[cid] != 0, "not closing"
    assert block.timestamp >= self.closing_deadline[cid], "dispute window open"
    assert not self.channel_done[cid], "channel already settled"
    self.channel_done[cid] = True
    self.settled_tokens[cid] = self.closing_tokens[cid]
    if self.closing_tokens[cid] > 0:
        self._apply(client, server, epoch, self.closing_tokens[cid])


# ---- training rounds ---------------------------------------------------------------------------

@view
@external
def round_digest(run: bytes32, round: uint256, epoch: uint256, members: DynArray[address, MAX_MEMBERS],
                 samples: DynArray[uint256, MAX_MEMBERS]) -> bytes32:
    return self._round_digest(run, round, epoch, members, samples)


@view
@internal
def _round_digest(run: bytes32, round: uint256, epoch: uint256, members: DynArray[address, MAX_MEMBERS],
                  samples: DynArray[uint256, MAX_MEMBERS]) -> bytes32:
    h: bytes32 = keccak256(abi_encode(ROUND_TYPEHASH, run, round, epoch, keccak256(abi_encode(members)),
                                      keccak256(abi_encode(samples))))
    return keccak256(concat(b"\x19\x01", self.domain_separator, h))


@external
def record_round(run: bytes32, round: uint256, epoch: uint256, members: DynArray[address, MAX_MEMBERS],
                 samples: DynArray[uint256, MAX_MEMBERS], vs: DynArray[uint8, MAX_MEMBERS],
                 rs: DynArray[bytes32, MAX_MEMBERS], ss: DynArray[bytes32, MAX_MEMBERS]):
    """A training round's record, signed by every member: each member's samples earn credit in `epoch`."""
    n: uint256 = len(members)
    assert n >= 2, "a round needs two members"
    assert len(samples) == n and len(vs) == n and len(rs) == n and len(ss) == n, "lengths differ"
    now: uint256 = self._epoch()
    assert epoch <= now and epoch + 1 >= now, "round outside this or the last epoch"
    digest: bytes32 = self._round_digest(run, round, epoch, members, samples)
    assert not self.round_done[digest], "round already recorded"
    self.round_done[digest] = True
    prev: uint256 = 0
    for i: uint256 in range(n, bound=MAX_MEMBERS):
        m: address = members[i]
        assert convert(m, uint256) > prev, "members not in ascending order"
        prev = convert(m, uint256)
        assert self.peer_key_of[m] != empty(bytes32), "member not registered"
        assert self._signer(digest, vs[i], rs[i], ss[i]) == m, "not signed by every member"
        self.credit_of[m][epoch] += samples[i] * self.sample_credit
    log RoundRecorded(digest=digest, epoch=epoch)


# ---- priority auction --------------------------------------------------------------------------

@view
@internal
def _phase(target: uint256) -> uint256:
    """0: too early, 1: commit, 2: reveal, 3: over (settle)."""
    if target == 0:
        return 3
    start: uint256 = self.genesis + (target - 1) * self.epoch_seconds
    if block.timestamp < start:
        return 0
    if block.timestamp < start + self.epoch_seconds // 2:
        return 1
    if block.timestamp < start + self.epoch_seconds:
        return 2
    return 3


@view
@external
def auction_phase(target: uint256) -> uint256:
    return self._phase(target)


@pure
@external
def seal(bidder: address, target: uint256, amount: uint256, salt: bytes32) -> bytes32:
    return keccak256(abi_encode(bidder, target, amount, salt))


@external
@payable
def commit(target: uint256, sealed: bytes32):
    """A sealed bid for a slot in epoch `target`; msg.value is the escrow (at least the bid)."""
    assert self._phase(target) == 1, "not the commit phase"
    assert msg.value > 0, "no escrow"
    assert self.commit_of[target][msg.sender] == empty(bytes32), "already committed"
    self.commit_of[target][msg.sender] = sealed
    self.escrow_of[target][msg.sender] = msg.value


@external
def reveal(target: uint256, amount: uint256, salt: bytes32):
    assert self._phase(target) == 2, "not the reveal phase"
    assert not self.revealed_of[target][msg.sender], "already revealed"
    assert self.commit_of[target][msg.sender] != empty(bytes32), "no commit"
    assert keccak256(abi_encode(msg.sender, target, amount, salt)) == self.commit_of[target][msg.sender], "reveal does not match the commit"
    assert amount > 0 and amount <= self.escrow_of[target][msg.sender], "bid above its escrow"
    self.revealed_of[target][msg.sender] = True
    # keep the K+1 highest, highest first; a tie ranks behind the earlier reveal
    top: DynArray[Bid, MAX_SLOTS + 1] = self.top_bids[target]
    keep: uint256 = self.slots + 1
    out: DynArray[Bid, MAX_SLOTS + 1] = []
    placed: bool = False
    for b: Bid in top:
        if not placed and amount > b.amount:
            if len(out) < keep:
                out.append(Bid(bidder=msg.sender, amount=amount))
            placed = True
        if len(out) < keep:
            out.append(b)
    if not placed and len(out) < keep:
        out.append(Bid(bidder=msg.sender, amount=amount))
    self.top_bids[target] = out


@external
def settle_auction(target: uint256):
    assert self._phase(target) == 3, "reveal phase not over"
    assert not self.auction_done[target], "auction already settled"
    self.auction_done[target] = True
    top: DynArray[Bid, MAX_SLOTS + 1] = self.top_bids[target]
    k: uint256 = self.slots
    price: uint256 = 0
    if len(top) > k:
        price = top[k].amount
    winners: uint256 = 0
    for i: uint256 in range(MAX_SLOTS):
        if i >= k or i >= len(top):
            break
        self.slot_holder[target][top[i].bidder] = True
        winners += 1
    self.auction_price[target] = price
    self.balance_of[self.owner] += price * winners
    log AuctionSettled(epoch=target, price=price, winners=winners)


@external
def claim_refund(target: uint256) -> uint256:
    """After settlement: the caller's escrow back to its balance, less the price if it won."""
    assert self.auction_done[target], "auction not settled"
    escrow: uint256 = self.escrow_of[target][msg.sender]
    assert escrow > 0, "nothing to refund"
    self.escrow_of[target][msg.sender] = 0
    refund: uint256 = escrow
    if self.slot_holder[target][msg.sender]:
        refund -= self.auction_price[target]
    self.balance_of[msg.sender] += refund
    return refund


@view
@external
def top(target: uint256) -> DynArray[Bid, MAX_SLOTS + 1]:
    return self.top_bids[target]
