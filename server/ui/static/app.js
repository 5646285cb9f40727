/* Mobility's dashboard: renders each page from its JSON (/api/...) and fetches it again every refresh, so the pages
   live without a reload. Text from machines (hostnames, messages) only ever goes into the page as text
   (textContent), never as markup. Charts are uPlot (static/vendor/uplot/). No other dependency, no network but
   this server. */
"use strict";

(() => {
  const body = document.body;
  const page = body.dataset.page;
  const ident = body.dataset.id || "";
  const meta = (name) => (document.querySelector(`meta[name="${name}"]`) || {}).content || "";
  const csrf = meta("csrf-token");
  const refreshSeconds = Math.max(1, Number(meta("refresh-seconds")) || 10);
  const app = document.getElementById("app");

  // Building the page ---------------------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function section(title, ...children) {
    return el("section", { class: "card" }, el("h2", { text: title }), ...children);
  }

  function table(id, columns) {
    const head = el("tr", {}, columns.map((c) => (typeof c === "string" ? el("th", { text: c }) : c)));
    const tbody = el("tbody");
    return { node: el("table", { id }, el("thead", {}, head), tbody), tbody };
  }

  function fill(tbody, rows, empty) {
    const cols = tbody.parentNode.querySelectorAll("thead th").length || 1;
    tbody.replaceChildren(
      ...(rows.length ? rows : [el("tr", { class: "empty" }, el("td", { colspan: cols, text: empty || "none" }))])
    );
  }

  function badge(value, kind) {
    const text = value === null || value === undefined ? "-" : String(value);
    return el("span", { class: `badge ${kind || ""} v-${text.replace(/[^A-Za-z0-9]+/g, "_")}`, text });
  }

  function link(href, text) {
    return el("a", { href, text });
  }

  // Figures -------------------------------------------------------------------------------------------------------

  const num = (n) => typeof n === "number" && Number.isFinite(n);

  function bytes(n) {
    if (!num(n) || n < 0) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? `${n.toFixed(0)} B` : `${n.toFixed(1)} ${units[i]}`;
  }

  function shortBytes(n) {
    if (!num(n) || n < 0) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n >= 10 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
  }

  function secs(s) {
    if (!num(s) || s < 0) return "-";
    if (s < 120) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    if (s < 7200) return `${(s / 60).toFixed(0)} min`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
    return `${(s / 86400).toFixed(1)} d`;
  }

  function when(t) {
    if (!num(t)) return "-";
    return new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function ago(t) {
    if (!num(t)) return el("span", { text: "never" });
    return el("span", { title: when(t), text: `${secs(Math.max(0, Date.now() / 1000 - t))} ago` });
  }

  function count(n) {
    return num(n) ? n.toLocaleString("en") : "-";
  }

  // Talking to the server ------------------------------------------------------------------------------------------

  class Refused extends Error {
    constructor(status, error) {
      super(error ? `${error.code}: ${error.message}` : `HTTP ${status}`);
      this.status = status;
      this.error = error || null;
    }
  }

  let figuresOf = null; // when the server read the figures shown (its snapshot of the fleet)
  let figuresAge = 0; // and how old they were when it sent them, by its own clock

  async function getJSON(url) {
    const r = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    const doc = await r.json().catch(() => null);
    if (!r.ok) throw new Refused(r.status, doc && doc.error);
    if (doc && num(doc.taken_at)) {
      figuresOf = doc.taken_at;
      figuresAge = num(doc.age_seconds) ? doc.age_seconds : 0;
    }
    return doc;
  }

  async function post(url, doc) {
    const r = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, Accept: "application/json" },
      body: JSON.stringify(doc || {}),
    });
    const answer = await r.json().catch(() => null);
    if (!r.ok) throw new Refused(r.status, answer && answer.error);
    return answer;
  }

  const banner = el("div", { id: "banner", role: "status" });

  function say(text, kind) {
    banner.className = kind || "info";
    banner.textContent = text;
  }

  function refused(e) {
    if (e instanceof Refused && e.status === 401) {
      window.location.assign(`/login?next=${encodeURIComponent(window.location.pathname + window.location.search)}`);
      return;
    }
    const error = e instanceof Refused ? e.error : null;
    say(error ? `${error.code}: ${error.message} — ${error.fix}` : String(e.message || e), "error");
  }

  // Charts --------------------------------------------------------------------------------------------------------

  const COLOURS = ["#2f6fde", "#d9534f", "#3c9a5f", "#c98a12", "#7b4fc9", "#555"];

  class Chart {
    constructor(title, labels, unit, id) {
      this.labels = labels;
      this.unit = unit;
      this.box = el("div", { class: "chart", id, dataset: { samples: "0" } }, el("h3", { text: title }));
      this.plot = null;
    }

    update(data) {
      const columns = data && data.length ? data : [[], ...this.labels.map(() => [])];
      const samples = columns[0].length;
      this.box.dataset.samples = String(samples);
      this.box.dataset.last = samples ? String(columns[0][samples - 1]) : "";
      this.box.dataset.values = JSON.stringify(columns.slice(1).map((c) => (c.length ? c[c.length - 1] : null)));
      if (typeof uPlot === "undefined") return;
      if (this.plot === null) {
        const width = Math.max(280, (this.box.clientWidth || 480) - 8);
        const format = this.unit === "bytes" ? (v) => `${shortBytes(v)}/s` : this.unit === "s" ? secs : (v) => `${v}`;
        this.plot = new uPlot(
          {
            width,
            height: 170,
            series: [{}, ...this.labels.map((label, i) => ({ label, stroke: COLOURS[i % COLOURS.length], width: 1.5,
                                                           spanGaps: false, value: (u, v) => (v === null ? "-" : format(v)) }))],
            axes: [{}, { values: (u, splits) => splits.map(format), size: 86 }],
            scales: { x: { time: true } },
            legend: { live: true },
          },
          columns,
          this.box
        );
      } else {
        this.plot.setData(columns);
      }
    }
  }

  // Pages ---------------------------------------------------------------------------------------------------------

  const pages = {};

  pages.overview = () => {
    const totals = el("div", { class: "cards" });
    const byOs = table("by-os-tag", ["OS tag", "machines"]);
    const byVersion = table("by-version", ["agent version", "machines"]);
    const rollouts = table("active-rollouts", ["rollout", "version", "wave", "machines", "started"]);
    const errors = table("recent-errors", ["when", "machine", "kind", "error", "remediation"]);
    const diskErrors = table("disk-errors", ["machine", "disk", "state", "error", "detail"]);
    const latency = new Chart("Heartbeat latency (this instance)", ["p50 ms", "p99 ms"], "ms", "chart-heartbeat-latency");
    const rate = new Chart("Heartbeats per second (this instance)", ["heartbeats/s"], "", "chart-heartbeat-rate");
    const lag = new Chart("Largest lag in the fleet", ["lag"], "s", "chart-fleet-lag");
    const throughput = new Chart("Replication throughput, all disks", ["throughput"], "bytes", "chart-fleet-throughput");
    app.replaceChildren(
      banner,
      totals,
      el("div", { class: "charts" }, latency.box, rate.box, lag.box, throughput.box),
      el("div", { class: "columns" }, section("By OS tag", byOs.node), section("By agent version", byVersion.node)),
      section("Active rollouts", rollouts.node),
      section("Recent errors", errors.node),
      section("Disks reporting an error", diskErrors.node)
    );
    return async () => {
      const d = await getJSON("/api/overview");
      const c = d.counts;
      const get = (group, key) => (c[group] && c[group][key]) || 0;
      const card = (title, id, rows) =>
        el("div", { class: "card figure", id },
          el("h2", { text: title }),
          el("dl", {}, rows.map(([k, v, cls]) => [el("dt", { text: k }), el("dd", { class: cls || "", text: v })])));
      const store = d.store;
      totals.replaceChildren(
        card("Machines", "card-machines", [["total", count(d.machines)], ["online", count(get("state", "online"))],
          ["offline", count(get("state", "offline")), get("state", "offline") ? "bad" : ""],
          ["never seen", count(get("state", "never seen"))], ["revoked", count(get("state", "revoked"))]]),
        card("Health", "card-health", [["healthy", count(get("health", "healthy"))],
          ["warning", count(get("health", "warning")), get("health", "warning") ? "warn" : ""],
          ["critical", count(get("health", "critical")), get("health", "critical") ? "bad" : ""],
          ["unknown", count(get("health", "unknown"))]]),
        card("Protection", "card-protection", [["protected disks", count(d.disks)],
          ["RPO breaches", count(d.breaches), d.breaches ? "bad" : ""],
          ["unprotected machines", count(get("protection", "unprotected"))]]),
        card("Store", "card-store", store ? [["stored", bytes(store.store_bytes)], ["free", bytes(store.free_bytes),
          store.free_bytes < 2 * store.reserve_bytes ? "bad" : ""], ["filesystem", bytes(store.filesystem_bytes)],
          ["reserve", bytes(store.reserve_bytes)]] : [["", "no chunk store on this instance"]]),
        card("This instance", "card-instance", [["heartbeats answered", count(d.instance.heartbeats)],
          ["connections", count(d.instance.connections)], ["loop stall p99", `${d.instance.loop_stall_p99_ms} ms`],
          ["loop stall max", `${Math.round(d.instance.loop_stall_max_ms)} ms`]])
      );
      const series = d.series.data;
      const col = (name) => series[d.series.columns.indexOf(name)] || [];
      latency.update([series[0], col("heartbeat_p50_ms"), col("heartbeat_p99_ms")]);
      rate.update([series[0], col("heartbeats_per_second")]);
      lag.update([series[0], col("max_lag_seconds")]);
      throughput.update([series[0], col("throughput_bps")]);
      const counted = (o) => Object.entries(o || {}).sort((a, b) => b[1] - a[1]);
      fill(byOs.tbody, counted(c.os_tag).map(([k, v]) => el("tr", {}, el("td", {},
        link(`/machines?os_tag=${encodeURIComponent(k)}`, k)), el("td", { text: count(v) }))));
      fill(byVersion.tbody, counted(c.version).map(([k, v]) => el("tr", {}, el("td", {},
        link(`/machines?version=${encodeURIComponent(k)}`, k)), el("td", { text: count(v) }))));
      fill(rollouts.tbody, d.rollouts.map((r) => el("tr", {},
        el("td", {}, link(`/rollouts/${r.rollout_id}`, r.rollout_id.slice(0, 8))), el("td", { text: r.to_version }),
        el("td", { text: `${r.current_wave} of ${r.waves}` }),
        el("td", { text: Object.entries(r.counts).map(([k, v]) => `${v} ${k}`).join(", ") }),
        el("td", {}, ago(r.created_at)))), "no rollout is running");
      fill(errors.tbody, d.errors.map((j) => el("tr", {},
        el("td", {}, ago(j.updated_at)),
        el("td", {}, j.host_id ? link(`/machines/${j.host_id}`, j.hostname) : j.hostname),
        el("td", { text: `${j.kind} (${j.state})` }), el("td", {}, badge(j.error_id, "error")),
        el("td", { text: j.remediation || "" }))), "no failed job");
      fill(diskErrors.tbody, d.disk_errors.map((x) => el("tr", {},
        el("td", {}, link(`/machines/${x.host_id}`, x.hostname)), el("td", { text: x.disk }),
        el("td", {}, badge(x.state)), el("td", {}, badge(x.error, "error")), el("td", { text: x.detail || "" }))),
        "no disk reports an error");
    };
  };

  const MACHINE_COLUMNS = [
    ["hostname", "Hostname"], ["host_id", "Host ID"], ["os_tag", "OS"], ["version", "Version"],
    ["last_seen", "Last seen"], ["state", "State"], ["health", "Health"], ["protection", "Protection"],
    ["lag", "Lag / RPO"],
  ];

  pages.machines = () => {
    const params = new URLSearchParams(window.location.search);
    const state = {
      q: params.get("q") || "", state: params.get("state") || "", health: params.get("health") || "",
      protection: params.get("protection") || "", os_tag: params.get("os_tag") || "",
      version: params.get("version") || "", sort: params.get("sort") || "hostname",
      order: params.get("order") || "asc", offset: Number(params.get("offset")) || 0,
      limit: Number(params.get("limit")) || 100,
    };
    let refresh = null;
    const changed = () => {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(state)) if (v !== "" && !(k === "offset" && v === 0)) q.set(k, v);
      window.history.replaceState(null, "", `/machines?${q}`);
      if (refresh) refresh().catch(refused);
    };
    const select = (name, label, options) => {
      const s = el("select", { name, id: `filter-${name}`, onchange: () => { state[name] = s.value; state.offset = 0;
        changed(); } }, el("option", { value: "", text: `${label}: any` }),
        options.map((o) => el("option", { value: o, text: o })));
      s.value = state[name];
      return s;
    };
    let timer = null;
    const search = el("input", { type: "search", id: "filter-q", placeholder: "hostname or host ID", value: state.q,
      oninput: () => { clearTimeout(timer); timer = setTimeout(() => { state.q = search.value.trim(); state.offset = 0;
        changed(); }, 250); } });
    const osSelect = select("os_tag", "OS", []);
    const versionSelect = select("version", "version", []);
    const filters = el("div", { class: "filters" }, search,
      select("state", "state", ["online", "offline", "never seen", "revoked"]),
      select("health", "health", ["healthy", "warning", "critical", "unknown"]),
      select("protection", "protection", ["breach", "unprotected", "waiting", "CONTINUOUS", "INITIAL_SYNC",
        "RESYNCING", "RESYNC_REQUIRED", "PAUSED", "STALLED"]), osSelect, versionSelect);
    const heads = MACHINE_COLUMNS.map(([key, title]) => el("th", { class: "sortable", dataset: { sort: key },
      onclick: () => { state.order = state.sort === key && state.order === "asc" ? "desc" : "asc"; state.sort = key;
        state.offset = 0; changed(); } }, title));
    const machines = table("machines", heads);
    const summary = el("span", { id: "machines-count" });
    const prev = el("button", { type: "button", id: "page-prev", text: "‹ previous",
      onclick: () => { state.offset = Math.max(0, state.offset - state.limit); changed(); } });
    const next = el("button", { type: "button", id: "page-next", text: "next ›",
      onclick: () => { state.offset += state.limit; changed(); } });
    app.replaceChildren(banner, section("Machines", filters, machines.node, el("div", { class: "pager" }, prev, summary,
      next)));
    const refill = (s, values) => {
      const want = ["", ...values];
      const have = Array.from(s.options).map((o) => o.value);
      if (want.join("\n") === have.join("\n")) return;
      const label = s.options[0].textContent;
      s.replaceChildren(el("option", { value: "", text: label }), values.map((o) => el("option", { value: o, text: o })));
      s.value = state[s.name];
    };
    refresh = async () => {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(state)) if (v !== "") q.set(k, v);
      const d = await getJSON(`/api/machines?${q}`);
      refill(osSelect, d.os_tags);
      refill(versionSelect, d.versions);
      for (const th of heads) {
        th.classList.toggle("asc", th.dataset.sort === d.sort && d.order === "asc");
        th.classList.toggle("desc", th.dataset.sort === d.sort && d.order === "desc");
      }
      fill(machines.tbody, d.machines.map((m) => el("tr", { dataset: { hostId: m.host_id } },
        el("td", {}, link(`/machines/${m.host_id}`, m.hostname)), el("td", { class: "mono", text: m.host_id }),
        el("td", { text: m.os_tag }), el("td", { text: m.agent_version }), el("td", {}, ago(m.last_seen)),
        el("td", {}, badge(m.state)), el("td", {}, badge(m.health)), el("td", {}, badge(m.protection)),
        el("td", { class: m.breach ? "bad" : "", text: m.rpo_seconds ? `${secs(m.lag_seconds)} / ${secs(m.rpo_seconds)}` : "-" }))),
        "no machine matches");
      const last = Math.min(d.offset + d.machines.length, d.total);
      summary.textContent = d.total ? `${count(d.offset + 1)}–${count(last)} of ${count(d.total)}` +
        (d.total !== d.fleet ? ` (fleet: ${count(d.fleet)})` : "") : `0 of ${count(d.fleet)}`;
      prev.disabled = d.offset === 0;
      next.disabled = last >= d.total;
    };
    return refresh;
  };

  pages.machine = () => {
    const title = el("h1", { id: "machine-title", text: "Machine" });
    const actions = el("div", { class: "actions" });
    const info = el("dl", { id: "machine-info", class: "info" });
    const checks = table("health-checks", ["check", "status", "message", "value", "remediation"]);
    const disks = table("disks", ["disk", "state", "size", "left", "lag", "RPO", "throughput", "ETA", "last point",
      "error"]);
    const charts = el("div", { class: "charts", id: "disk-charts" });
    const points = table("points", ["point", "made", "consistency", "freeze", "complete", "disks"]);
    const jobs = table("jobs", ["kind", "state", "error", "remediation", "detail", "updated"]);
    const updates = table("updates", ["state", "error", "detail", "updated"]);
    const failovers = table("machine-test-failovers", ["state", "error", "detail", "when"]);
    const pin = el("p", { id: "pin" });
    app.replaceChildren(banner, el("div", { class: "title" }, title, actions),
      el("div", { class: "columns" }, section("Machine", info), section("Health checks", checks.node)),
      section("Disks", disks.node, charts), section("Recovery points", points.node),
      section("Update history", pin, updates.node), section("Test failovers", failovers.node),
      section("Jobs", jobs.node));
    const diskCharts = new Map();
    return async () => {
      const d = await getJSON(`/api/machines/${encodeURIComponent(ident)}`);
      const m = d.machine;
      const v = d.view || {};
      document.title = `Mobility · ${m.hostname}`;
      title.replaceChildren(m.hostname, " ", badge(v.state), " ", badge(v.health || "unknown"), " ",
        badge(v.protection || "unprotected"));
      const buttons = [];
      if (d.protection) {
        const paused = d.protection.paused;
        buttons.push(el("button", { type: "button", id: paused ? "resume" : "pause",
          text: paused ? "Resume protection" : "Pause protection", onclick: async () => {
            try {
              await post(`/api/machines/${encodeURIComponent(ident)}/${paused ? "resume" : "pause"}`);
              say(paused ? "protection resumed" : "protection paused", "info");
              await update();
            } catch (e) { refused(e); }
          } }));
        buttons.push(el("button", { type: "button", id: "test-failover", disabled: d.test_failover_running,
          text: d.test_failover_running ? "Test failover running…" : "Test failover of the newest point",
          onclick: async () => {
            if (!window.confirm(`Start a test failover of ${m.hostname}'s newest point?`)) return;
            try {
              await post(`/api/machines/${encodeURIComponent(ident)}/test-failover`);
              say("test failover started: its result appears below and in the audit log", "info");
              await update();
            } catch (e) { refused(e); }
          } }));
      }
      actions.replaceChildren(...buttons);
      const rows = [["host ID", m.host_id], ["OS tag", m.os_tag], ["role / platform", `${m.role} / ${m.platform}`],
        ["agent version", m.agent_version], ["enrolled", when(m.enrolled_at)], ["last seen", when(m.last_seen)],
        ["heartbeat interval", secs(m.heartbeat_interval)], ["certificate expires", when(m.certificate_expires)],
        ["policy", d.protection ? `${d.protection.policy.name} (RPO ${secs(d.protection.policy.rpo_seconds)}, ` +
          `a point every ${secs(d.protection.policy.interval_seconds)}, keeps ${d.protection.policy.retention})`
          : "not protected"],
        ["newest point", when(v.newest_point)], ["cloned from", m.cloned_from || "-"],
        ["revoked", m.revoked_at ? when(m.revoked_at) : "no"]];
      info.replaceChildren(...rows.flatMap(([k, val]) => [el("dt", { text: k }), el("dd", { text: val })]));
      const health = m.health ? m.health.checks : [];
      fill(checks.tbody, health.map((c) => el("tr", {}, el("td", { class: "mono", text: c.id }),
        el("td", {}, badge(c.status)), el("td", { text: c.message }),
        el("td", { text: c.value ? `${c.value}${c.threshold ? ` (limit ${c.threshold})` : ""}` : "" }),
        el("td", { text: c.status === "PASS" ? "" : c.remediation }))), "no health report yet");
      fill(disks.tbody, d.disks.map((x) => el("tr", { class: x.breach ? "breach" : "", dataset: { disk: x.disk } },
        el("td", { class: "mono", text: x.disk }), el("td", {}, badge(x.state)), el("td", { text: bytes(x.size) }),
        el("td", { text: bytes(x.bytes_left) }), el("td", { text: secs(x.lag_now_seconds) + (x.stale ? " (stale)" : "") }),
        el("td", { text: secs(x.rpo_seconds) }), el("td", { text: `${bytes(x.throughput_bps)}/s` }),
        el("td", { text: secs(x.eta_seconds) }), el("td", { text: when(x.last_point) }),
        el("td", {}, x.error ? badge(x.error, "error") : "", x.detail ? ` ${x.detail}` : ""))),
        d.protection ? "no disk reported yet" : "not protected");
      for (const [i, x] of d.disks.entries()) {
        let pair = diskCharts.get(x.disk);
        if (!pair) {
          pair = [new Chart(`Lag of ${x.disk}`, ["lag"], "s", `chart-lag-${i}`),
                  new Chart(`Throughput of ${x.disk}`, ["throughput"], "bytes", `chart-throughput-${i}`)];
          pair[0].box.dataset.disk = x.disk;
          pair[1].box.dataset.disk = x.disk;
          diskCharts.set(x.disk, pair);
          charts.append(pair[0].box, pair[1].box);
        }
        const s = x.series || [[], [], [], []];
        pair[0].update([s[0], s[1]]);
        pair[1].update([s[0], s[2]]);
      }
      fill(points.tbody, d.points.map((p) => el("tr", {}, el("td", { class: "mono", text: p.point_id }),
        el("td", { text: when(p.created) }), el("td", {}, badge(p.consistency)),
        el("td", { text: num(p.freeze_ms) ? `${p.freeze_ms.toFixed(0)} ms` : "-" }),
        el("td", { text: p.complete ? "yes" : "no" }), el("td", { text: p.disks.map((x) => x.disk).join(", ") }))),
        "no recovery point yet");
      const jobRow = (j) => el("tr", {}, el("td", { text: j.kind }), el("td", {}, badge(j.state)),
        el("td", {}, j.error_id ? badge(j.error_id, "error") : ""), el("td", { text: j.remediation || "" }),
        el("td", { text: j.detail || "" }), el("td", {}, ago(j.updated_at)));
      fill(jobs.tbody, d.jobs.map(jobRow), "no job");
      pin.textContent = m.pinned ? `pinned to ${m.pinned}: ${m.pin_reason || ""}` :
        m.target_version && m.target_version !== m.agent_version ? `moving to ${m.target_version}` : "follows rollouts";
      fill(updates.tbody, d.jobs.filter((j) => j.kind === "upgrade").map((j) => el("tr", {}, el("td", {},
        badge(j.state)), el("td", {}, j.error_id ? badge(j.error_id, "error") : ""), el("td", { text: j.detail || "" }),
        el("td", {}, ago(j.updated_at)))), "no update");
      fill(failovers.tbody, d.jobs.filter((j) => j.kind === "test-failover").map((j) => el("tr", {},
        el("td", {}, badge(j.state)), el("td", {}, j.error_id ? badge(j.error_id, "error") : ""),
        el("td", { text: j.detail || "" }), el("td", {}, ago(j.updated_at)))), "no test failover yet");
    };
  };

  pages.protection = () => {
    const params = new URLSearchParams(window.location.search);
    const state = { breach: params.get("breach") || "", state: params.get("state") || "", q: params.get("q") || "",
      offset: 0, limit: 100 };
    let refresh = null;
    const summary = el("p", { id: "protection-summary" });
    const breachOnly = el("input", { type: "checkbox", id: "filter-breach", checked: state.breach === "1",
      onchange: () => { state.breach = breachOnly.checked ? "1" : ""; state.offset = 0; refresh().catch(refused); } });
    const disks = table("protected-disks", ["machine", "disk", "state", "lag", "RPO", "lag / RPO", "throughput",
      "ETA", "last point"]);
    const running = el("p", { id: "test-failover-running" });
    const failovers = table("test-failovers", ["when", "machine", "result", "error", "detail"]);
    const prev = el("button", { type: "button", id: "page-prev", text: "‹ previous",
      onclick: () => { state.offset = Math.max(0, state.offset - state.limit); refresh().catch(refused); } });
    const next = el("button", { type: "button", id: "page-next", text: "next ›",
      onclick: () => { state.offset += state.limit; refresh().catch(refused); } });
    const pageText = el("span");
    app.replaceChildren(banner,
      section("Every protected disk against its RPO target (breaches first)", summary,
        el("div", { class: "filters" }, el("label", {}, breachOnly, " RPO breaches only")), disks.node,
        el("div", { class: "pager" }, prev, pageText, next)),
      section("Test failovers", running, failovers.node));
    refresh = async () => {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(state)) if (v !== "") q.set(k, v);
      const d = await getJSON(`/api/protection?${q}`);
      summary.textContent = `${count(d.all_disks)} protected disks, ${count(d.breaches)} past their RPO target`;
      summary.className = d.breaches ? "bad" : "";
      fill(disks.tbody, d.disks.map((x) => {
        const ratio = x.rpo_seconds > 0 && num(x.lag_now_seconds) ? x.lag_now_seconds / x.rpo_seconds : 0;
        return el("tr", { class: x.breach ? "breach" : "", dataset: { hostId: x.host_id, disk: x.disk } },
          el("td", {}, link(`/machines/${x.host_id}`, x.hostname)), el("td", { class: "mono", text: x.disk }),
          el("td", {}, badge(x.state), x.stale ? " stale" : ""), el("td", { text: secs(x.lag_now_seconds) }),
          el("td", { text: secs(x.rpo_seconds) }),
          el("td", {}, el("span", { class: "bar" }, el("span", { class: ratio > 1 ? "fill over" : "fill",
            style: `width:${Math.min(100, ratio * 100).toFixed(0)}%` })), ` ${(ratio * 100).toFixed(0)}%`),
          el("td", { text: `${bytes(x.throughput_bps)}/s` }), el("td", { text: secs(x.eta_seconds) }),
          el("td", { text: when(x.last_point) }));
      }), "no protected disk");
      pageText.textContent = d.total ? `${count(d.offset + 1)}–${count(Math.min(d.offset + d.limit, d.total))} of ` +
        `${count(d.total)}` : "";
      prev.disabled = d.offset === 0;
      next.disabled = d.offset + d.limit >= d.total;
      running.textContent = d.running ? `a test failover of ${d.running.host_id} is running (started ` +
        `${when(d.running.started)})` : "";
      fill(failovers.tbody, d.test_failovers.map((j) => el("tr", {}, el("td", {}, ago(j.updated_at)),
        el("td", {}, j.host_id ? link(`/machines/${j.host_id}`, j.hostname) : j.hostname),
        el("td", {}, badge(j.state === "succeeded" ? "PASSED" : "FAILED")),
        el("td", {}, j.error_id ? badge(j.error_id, "error") : ""), el("td", { text: j.detail || "" }))),
        "no test failover yet");
    };
    return refresh;
  };

  function haltButton(after) {
    return el("button", { type: "button", id: "halt", class: "danger", text: "Halt the rollout", onclick: async () => {
      const reason = window.prompt("Halt the running rollout: why?", "");
      if (reason === null) return;
      try {
        await post("/api/rollouts/halt", { reason });
        say("rollout halted", "info");
        await after();
      } catch (e) { refused(e); }
    } });
  }

  pages.rollouts = () => {
    const rollouts = table("rollouts", ["rollout", "version", "for", "state", "wave", "machines", "reason", "started"]);
    const actions = el("div", { class: "actions" });
    app.replaceChildren(banner, section("Rollouts, newest first", actions, rollouts.node));
    const update = async () => {
      const d = await getJSON("/api/rollouts");
      actions.replaceChildren(...(d.rollouts.some((r) => r.state === "running") ? [haltButton(update)] : []));
      fill(rollouts.tbody, d.rollouts.map((r) => el("tr", { dataset: { rolloutId: r.rollout_id } },
        el("td", {}, link(`/rollouts/${r.rollout_id}`, r.rollout_id.slice(0, 8))), el("td", { text: r.to_version }),
        el("td", { text: r.selection }), el("td", {}, badge(r.state)), el("td", { text: `${r.current_wave} of ${r.waves}` }),
        el("td", { text: Object.entries(r.counts).map(([k, v]) => `${v} ${k}`).join(", ") }),
        el("td", { text: r.reason || "" }), el("td", {}, ago(r.created_at)))), "no rollout yet");
    };
    return update;
  };

  pages.rollout = () => {
    const state = { state: "", offset: 0, limit: 100 };
    const head = el("dl", { id: "rollout-info", class: "info" });
    const actions = el("div", { class: "actions" });
    const filter = el("select", { id: "filter-state", onchange: () => { state.state = filter.value; state.offset = 0;
      update().catch(refused); } }, el("option", { value: "", text: "state: any" }),
      ["waiting", "offered", "succeeded", "failed", "skipped", "withdrawn"].map((s) => el("option", { value: s, text: s })));
    const members = table("rollout-machines", ["machine", "wave", "from", "runs", "health", "state", "job",
      "error", "detail (a rollback's reason)"]);
    const pageText = el("span");
    const prev = el("button", { type: "button", id: "page-prev", text: "‹ previous",
      onclick: () => { state.offset = Math.max(0, state.offset - state.limit); update().catch(refused); } });
    const next = el("button", { type: "button", id: "page-next", text: "next ›",
      onclick: () => { state.offset += state.limit; update().catch(refused); } });
    app.replaceChildren(banner, section("Rollout", actions, head),
      section("Machines, wave by wave", el("div", { class: "filters" }, filter), members.node,
        el("div", { class: "pager" }, prev, pageText, next)));
    const update = async () => {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(state)) if (v !== "") q.set(k, v);
      const d = await getJSON(`/api/rollouts/${encodeURIComponent(ident)}?${q}`);
      const r = d.rollout;
      actions.replaceChildren(...(r.state === "running" ? [haltButton(update)] : []));
      const rows = [["rollout", r.rollout_id], ["version", r.to_version], ["for", r.selection], ["state", r.state],
        ["wave", `${r.current_wave} of ${r.waves} (${r.wave_size} machines each)`],
        ["failures allowed", String(r.max_failures)], ["machines", Object.entries(r.counts).map(([k, v]) =>
          `${v} ${k}`).join(", ")], ["reason", r.reason || "-"], ["started", when(r.created_at)]];
      head.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
      fill(members.tbody, d.members.map((m) => el("tr", { class: m.state === "failed" ? "breach" : "",
        dataset: { hostId: m.host_id } }, el("td", {}, link(`/machines/${m.host_id}`, m.hostname)),
        el("td", { text: m.wave }), el("td", { text: m.from_version }), el("td", { text: m.agent_version || "-" }),
        el("td", {}, badge(m.health || "unknown")), el("td", {}, badge(m.state)), el("td", { text: m.job_state || "-" }),
        el("td", {}, m.error_id ? badge(m.error_id, "error") : ""), el("td", { text: m.detail || "" }))),
        "no machine");
      pageText.textContent = d.total ? `${count(d.offset + 1)}–${count(Math.min(d.offset + d.limit, d.total))} of ` +
        `${count(d.total)}` : "";
      prev.disabled = d.offset === 0;
      next.disabled = d.offset + d.limit >= d.total;
    };
    return update;
  };

  pages.audit = () => {
    const entries = table("audit", ["when", "operator", "action", "target", "detail", "outcome", "from"]);
    app.replaceChildren(banner, section("Audit log: every change made through the dashboard", entries.node));
    return async () => {
      const d = await getJSON("/api/audit");
      fill(entries.tbody, d.entries.map((e) => el("tr", {}, el("td", { text: when(e.at) }),
        el("td", { text: e.operator }), el("td", { text: e.action }), el("td", { text: e.target }),
        el("td", { text: e.detail || "" }), el("td", { text: e.outcome || "asked for; not finished" }),
        el("td", { text: e.via }))), "nothing changed through the dashboard yet");
    };
  };

  // Running --------------------------------------------------------------------------------------------------------

  const logout = document.getElementById("logout");
  if (logout) {
    logout.addEventListener("click", async () => {
      try {
        await post("/logout");
      } catch (e) { /* the session may be gone already */ }
      window.location.assign("/login");
    });
  }

  let update = null;
  let busy = false;
  const stamp = document.getElementById("updated");

  async function tick() {
    if (busy || update === null) return;
    busy = true;
    try {
      await update();
      if (figuresAge > 3 * refreshSeconds + 10) {
        say(`These figures are ${secs(figuresAge)} old: the server has not read its database since. Check its log.`,
          "error");
      } else if (banner.className === "error") {
        say("", "");
      }
      if (stamp) {
        stamp.textContent = `figures of ${figuresOf === null ? "now" : when(figuresOf)} · refreshed ` +
          `${new Date().toLocaleTimeString()}, every ${refreshSeconds} s`;
      }
      body.dataset.refreshed = String(Number(body.dataset.refreshed || 0) + 1);
    } catch (e) {
      refused(e);
    } finally {
      busy = false;
    }
  }

  if (pages[page]) {
    update = pages[page]();
    tick();
    window.setInterval(tick, refreshSeconds * 1000);
  }
})();
