// swarmlm dashboard: renders /api/events snapshots (see dashboard/collect.py), no libraries.
//
// Each key of snapshot.panels names a panel; RENDERERS[name](snapshot) returns its DOM section.
// A panel without a renderer (a service added later) is shown as a raw table of its data, so a
// new service only needs a Panel in dashboard/panels.py to appear, and a renderer here to look good.
"use strict";

const RENDERERS = {};

function el(tag, attrs, ...children) {
  const node = tag === "svg" || SVG_TAGS.has(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  return node;
}
const SVG_TAGS = new Set(["polyline", "circle", "line", "text", "rect", "g"]);

function short(id) { return id && id.length > 14 ? id.slice(0, 6) + "…" + id.slice(-6) : id; }
function num(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits === undefined ? 1 : digits); }
function section(name, title, ...body) {
  return el("section", {class: "panel", id: "panel-" + name, "data-panel": name}, el("h2", {}, title), ...body);
}
function table(headers, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, headers.map(h => el("th", {}, h)))), el("tbody", {}, rows));
}

// ---- models: blocks as a row, the servers covering each, holes highlighted -----------------------
RENDERERS.models = function (snap) {
  const models = snap.models || [];
  if (!models.length) return section("models", "Models", el("p", {class: "muted"}, "no model is served in the swarm"));
  const servers = snap.servers || [];
  const parts = models.map(m => {
    const cells = m.coverage.map((n, i) => el("div", {
      class: "block" + (n === 0 ? " hole" : n === 1 ? " thin" : ""), "data-block": i, "data-servers": n,
      title: `block ${i}: ${n} live server(s), ${num(m.block_throughput[i], 0)} tokens/s`}, `${i}`, el("br"), `×${n}`));
    const holeText = m.holes.length
      ? el("span", {class: "holes", "data-holes": m.holes.map(h => h.join(":")).join(",")},
           "holes: " + m.holes.map(h => `${h[0]}:${h[1]}`).join(", "))
      : el("span", {class: "covered", "data-holes": ""}, "every block is covered");
    const mine = servers.filter(s => s.model === m.model);
    const rows = mine.map(s => el("tr", {class: "server", "data-peer-id": s.peer_id, "data-state": s.state,
                                         "data-blocks": `${s.blocks[0]}:${s.blocks[1]}`},
      el("td", {title: s.peer_id}, el("code", {}, short(s.peer_id))),
      el("td", {}, `${s.blocks[0]}:${s.blocks[1]}`),
      el("td", {}, el("div", {class: "span-bar"}, el("div", {style:
        `left:${100 * s.blocks[0] / m.n_layers}%;width:${100 * (s.blocks[1] - s.blocks[0]) / m.n_layers}%`}))),
      el("td", {class: "state"}, s.state + (s.stale ? ` (silent ${num(s.refreshed_s_ago, 0)} s)` : "")),
      el("td", {}, num(s.throughput, 0)), el("td", {class: "served"}, num(s.served_tokens_per_s, 1)),
      el("td", {}, s.sessions), el("td", {}, s.free_cache_tokens),
      el("td", {class: "quant"}, s.quantization || "none"), el("td", {}, s.dtype),
      el("td", {class: "version"}, s.version || "–")));
    return el("div", {class: "model", "data-model": m.model},
      el("p", {}, el("b", {}, "model "), el("code", {}, m.model), ` · ${m.n_layers} blocks · `,
         `pipeline ${num(m.throughput, 0)} tokens/s · serving ${num(m.served_tokens_per_s, 1)} tokens/s · `,
         `${m.sessions} session(s) · `, holeText),
      el("div", {class: "blocks"}, cells),
      table(["server", "blocks", "span", "state", "tokens/s per block", "served tokens/s", "sessions", "free cache",
             "quantization", "dtype", "version"], rows));
  });
  return section("models", "Models and servers", parts);
};

// ---- runs: peers, global step, a loss plot -------------------------------------------------------
function lossPlot(run, xname) {
  xname = xname || "step";
  const W = 420, H = 160, P = 30;
  const pts = run.history || [];
  const svg = el("svg", {class: "loss-plot", width: W, height: H, viewBox: `0 0 ${W} ${H}`,
                         "data-run-id": run.run_id, "data-points": pts.length});
  if (!pts.length) { svg.appendChild(el("text", {x: P, y: H / 2}, "no loss yet")); return svg; }
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const sx = x => P + (W - 2 * P) * (x - x0) / (x1 - x0), sy = y => H - P + (2 * P - H) * (y - y0) / (y1 - y0);
  svg.appendChild(el("line", {x1: P, y1: H - P, x2: W - P, y2: H - P, stroke: "#999"}));
  svg.appendChild(el("line", {x1: P, y1: P, x2: P, y2: H - P, stroke: "#999"}));
  svg.appendChild(el("polyline", {points: pts.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ")}));
  if (pts.length <= 200) pts.forEach(p => svg.appendChild(el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2})));
  svg.appendChild(el("text", {x: 2, y: P}, num(y1, 2)));
  svg.appendChild(el("text", {x: 2, y: H - P}, num(y0, 2)));
  svg.appendChild(el("text", {x: P, y: H - 8}, `${xname} ${x0}`));
  svg.appendChild(el("text", {x: W - P - 40, y: H - 8}, `${xname} ${x1}`));
  return svg;
}

RENDERERS.runs = function (snap) {
  const runs = snap.runs || [];
  if (!runs.length) return section("runs", "Training runs", el("p", {class: "muted"}, "no training run in the swarm"));
  return section("runs", "Training runs", runs.map(run => el("div", {class: "run", "data-run-id": run.run_id},
    el("p", {}, el("b", {}, "run "), el("code", {}, run.run_id),
       ` · ${run.peers.length} peer(s) · global step ${run.global_step} · ${num(run.samples_per_s)} samples/s · loss ${num(run.loss, 3)}`
       + (run.epsilon !== undefined && run.epsilon !== null ? ` · ε ${num(run.epsilon, 2)}` : "")),
    lossPlot(run),
    table(["peer", "step", "samples/s", "loss"], run.peers.map(p => el("tr", {"data-peer-id": p.peer_id},
      el("td", {title: p.peer_id}, el("code", {}, short(p.peer_id))), el("td", {}, p.step),
      el("td", {}, num(p.samples_per_s)), el("td", {}, num(p.loss, 3))))))));
};

// ---- store: roots with holders and replica counts ------------------------------------------------
RENDERERS.store = function (snap) {
  const store = snap.store || {roots: [], peers: []};
  if (!store.roots.length) return section("store", "Store", el("p", {class: "muted"}, "no pinned root in the swarm"));
  return section("store", "Store",
    table(["root", "bytes", "replicas", "target", "holders"], store.roots.map(r => el("tr", {"data-cid": r.cid},
      el("td", {}, el("code", {}, r.cid)), el("td", {}, r.size_bytes),
      el("td", {class: r.target && r.replicas < r.target ? "holes" : ""}, r.replicas), el("td", {}, r.target),
      el("td", {}, r.holders.map(short).join(", "))))),
    el("p", {class: "muted"}, `${store.peers.length} storage peer(s)`));
};

// ---- federated runs: round, clients, loss plot, ε under DP ----------------------------------------
RENDERERS.fl_runs = function (snap) {
  const runs = snap.fl_runs || [];
  if (!runs.length) return section("fl_runs", "Federated runs", el("p", {class: "muted"}, "no federated run in the swarm"));
  return section("fl_runs", "Federated runs", runs.map(run => el("div", {class: "fl-run", "data-run-id": run.run_id,
                                                                       "data-done": run.done},
    el("p", {}, el("b", {}, "federated run "), el("code", {}, run.run_id),
       ` · coordinator `, el("code", {title: run.coordinator}, short(run.coordinator)),
       ` · round ${run.done}/${run.rounds} · ${run.clients} client(s), ${run.dropped} dropped`,
       ` · train loss ${num(run.train_loss, 3)} · val loss ${num(run.val_loss, 3)}`,
       run.secure ? " · secure aggregation" : "",
       el("span", {class: "dp", "data-epsilon": run.dp ? run.epsilon : ""},
          run.dp ? ` · DP ε ${num(run.epsilon, 2)} (δ ${run.delta})` : " · no client-level DP"),
       run.sample_epsilon !== null && run.sample_epsilon !== undefined
         ? ` · DP-SGD sample ε ${num(run.sample_epsilon, 2)}` : ""),
    lossPlot(run, "round"))));
};

// ---- MPC: parties per model -----------------------------------------------------------------------
RENDERERS.mpc = function (snap) {
  const models = snap.mpc || [];
  if (!models.length) return section("mpc", "Private inference (MPC)", el("p", {class: "muted"}, "no MPC party in the swarm"));
  return section("mpc", "Private inference (MPC)",
    table(["model", "parties", "max tokens", "sessions possible"], models.map(m => el("tr", {"data-model": m.model,
                                                                                 "data-parties": m.parties.length},
      el("td", {}, el("code", {}, short(m.model))),
      el("td", {}, m.parties.map(p => short(p.peer_id)).join(", ")),
      el("td", {}, Math.min(...m.parties.map(p => p.max_tokens))),
      el("td", {class: m.ready ? "covered" : "holes"}, m.ready ? "yes" : `needs ${3 - m.parties.length} more`)))));
};

// ---- ledger: epoch, credit, quota ----------------------------------------------------------------
RENDERERS.ledger = function (snap) {
  const l = snap.ledger;
  if (!l) return section("ledger", "Ledger", el("p", {class: "muted"}, "reading the ledger…"));
  return section("ledger", "Ledger",
    el("p", {"data-epoch": l.epoch}, el("b", {}, "ledger "), el("code", {}, l.address),
       ` · epoch ${l.epoch} (renews in ${l.renews_in_s} s of ${l.epoch_seconds}) · ${l.servers} server(s)`,
       ` · ${l.free_tokens} free tokens an epoch`),
    table(["account", "peer", "server", "credit", "credit last epoch", "quota", "quota left", "deposit", "slot"],
      l.accounts.map(a => el("tr", {"data-account": a.account},
        el("td", {}, el("code", {}, short(a.account))), el("td", {title: a.peer_id || ""}, a.peer_id ? short(a.peer_id) : "–"),
        el("td", {}, a.server ? "yes" : ""), el("td", {}, a.credit), el("td", {}, a.credit_last_epoch),
        el("td", {}, a.quota), el("td", {}, a.quota_left), el("td", {}, a.deposit), el("td", {}, a.slot ? "yes" : "")))));
};

function generic(name, snap) {
  const data = snap[name];
  const rows = Array.isArray(data) ? data : [data];
  const keys = [...new Set(rows.flatMap(r => (r && typeof r === "object") ? Object.keys(r) : []))];
  if (!keys.length) return section(name, name, el("pre", {class: "raw"}, JSON.stringify(data, null, 1)));
  return section(name, name, table(keys, rows.map(r => el("tr", {},
    keys.map(k => el("td", {}, typeof r[k] === "object" ? JSON.stringify(r[k]) : String(r[k])))))));
}

function render(snap) {
  const root = document.getElementById("panels");
  const sections = (snap.panels || []).map(name => RENDERERS[name] ? RENDERERS[name](snap) : generic(name, snap));
  for (const [name, err] of Object.entries(snap.errors || {})) {
    sections.push(el("p", {class: "error"}, `${name}: ${err}`));
  }
  root.replaceChildren(...sections);
  const status = document.getElementById("status");
  status.textContent = `live · update ${snap.version} · ${new Date(snap.time * 1000).toLocaleTimeString()}`;
  status.className = "status live";
  status.setAttribute("data-version", snap.version);
  document.getElementById("seen-by").textContent = "seen by " + short(snap.peer_id);
}

function connect() {
  const source = new EventSource("/api/events");
  source.onmessage = e => render(JSON.parse(e.data));
  source.onerror = () => {
    const status = document.getElementById("status");
    status.textContent = "reconnecting…";
    status.className = "status down";
  };
}

window.SwarmDash = {RENDERERS, render, el, table, section};
connect();
