"""An OpenAI-compatible HTTP API in front of a local model or the swarm (`swarmlm api`).

Reading order:
- protocol.py   ApiError, Sampling, parse_completion / parse_chat, check_length, and the response
                JSON shapes: OpenAI's requests and answers as pure functions
- text.py       TextStream, cut_at_stop: ids to text, incrementally, cut at stop strings
- chat.py       ChatTemplate: the checkpoint's Jinja chat template, sandboxed as transformers runs it
- backends.py   LocalBackend, SwarmBackend: token streams generated off the web server's loop
- server.py     ApiApp (the Starlette app), EventStream (server-sent events, cancelled on
                disconnect), serve (uvicorn)
- run.py        api_from_args: the `swarmlm api` command

Not yet here: --private (MPC inference), --quantize, and the ledger's 429 (pay-per-use).
"""
