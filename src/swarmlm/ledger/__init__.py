"""Fair access to the swarm's model on an EVM ledger: credit for contribution, metered use, priority auctions.

In reading order:
- contracts/Ledger.vy   the contract: registry, deposits, epochs, channels, credit, quota, auction
- build.py              compiling it (pinned Vyper, in process, cached, reproducible): `Artifact`
- receipts.py           EIP-712 receipts and round records off chain; `Ticket`, what a client hands a server
- chain.py              one account on one deployed ledger through web3: `LedgerClient`, `deploy`
- node.py               the embedded dev chain: py-evm (eth-tester) behind JSON-RPC on 127.0.0.1
- keys.py               a peer's ledger key in its data dir, and the binding to its swarm peer ID
- policy.py             servers' admission: a pure `decide` over a cached `AccountView`; `Gate` wraps it
- payer.py              clients' side: signing cumulative receipts for the servers they open sessions on
- journal.py            per-session state on disk: a line appended per update, beside a snapshot
- rounds.py             training rounds' records: signing, checking, submitting (`train --swarm --ledger`)
- commands.py           `swarmlm ledger ...`
Siblings (swarm/, collab/, privacy/) never import this package; cli.py hands a server `gate.admit`,
and collab's round witness a `RoundBook`'s methods.
"""
