"""swarm: servers host spans of a model's blocks; clients generate and fine-tune through them.

Reading order:
    wire.py              the RPC messages both sides import (open/step/close, the steps channel,
                         link, forward/backward, info)
    dht.py               ServerRecord: what a server announces per block; read_servers
    blocks.py            run_span: a span of blocks with deep prompts (shared by servers and clients);
                         measure_throughput
    source.py            ModelSource: MODEL as a checkpoint directory or a manifest CID, and its id
    server/budget.py     Budget, BudgetLimits: sessions and cached tokens a server may hold
    server/saved.py      SavedForwards: forwards kept for their backward, bounded by bytes and age
    server/selection.py  choose_span, should_move: pure span choice and rebalancing
    server/chain.py      Inbox, NextLink: chained steps (inputs pushed in, outputs pushed to the next server)
    server/checks.py     RequestChecks: what a request must fit (span, shapes, dtypes, the budget's limits)
    server/spans.py      StatelessSpans: the stateless forward and backward handlers (kept forwards),
                         given the model, the checks, the kept forwards and the worker thread
    server/host.py       BlockHost: the rpc_* handlers, per-session KV caches, re-linking
    server/announce.py   Announcer: re-announce before expiry, offline on shutdown
    server/serve.py      run_server, serve_from_args (`swarmlm serve`), start_server_process
    client/routing.py    choose_chain: least expected latency over announced servers (pure)
    client/states.py     SessionState, NEXT, check_transition: a session's life (open, chained or hop-by-hop
                         steps, failover: recover, replay, re-link, closed); StepRecord
    client/hops.py       HopState, HopClient: what a session holds per hop, and the calls to one hop
                         (open, step, pushed input, replay)
    client/chained.py    ChainedSteps: a step sent to every hop at once, the next step's requests sent ahead
    client/session.py    InferenceSession: the state machine over the hops; failover onto replacements and
                         re-linked chains
    client/remote.py     RemoteBlocks (discovery, routing, forward/backward with failover), SwarmSpan
    client/model.py      RemoteModel: embeddings and head here, blocks in the swarm, the decode loop on the
                         client's loop thread (LoopThread.stream); generate_from_args
    finetune.py          Adapters (prompts, deep prompts, LoRA head), lm_loss, finetune (`swarmlm finetune`)

The client side never imports server/, and neither imports collab/, privacy/ or ledger/.
"""
