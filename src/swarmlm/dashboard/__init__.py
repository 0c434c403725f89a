"""dashboard: seeing the swarm — a live web page, its JSON API, and the Prometheus exposure of the verbs.

    swarmlm dashboard --initial-peers MADDR... [--host 127.0.0.1] [--port P]

view.py     pure: coverage, holes, staleness, loss history from plain records
panels.py   one `Panel` per service: reads its records through a `Peer` into plain JSON data
collect.py  the `Collector`: runs every panel, keeps the latest snapshot, wakes the live streams
app.py      the Starlette app: /, /static/*, /api/swarm, /api/events (server-sent events)
run.py      the command: a client peer, the collector's loop, uvicorn on 127.0.0.1
metrics.py  `expose(port)`: the process's Prometheus registry over HTTP, for `--metrics-port`
static/     the page (HTML, CSS, vanilla JS, an SVG loss plot): shipped here, nothing from elsewhere
"""
