// doppel dashboard: polls the node's JSON API and shows every source, replica and job.
// Served by the doppel binary itself (no framework, no external resources).
//
// Stable hooks for tests and scripts (read state without scraping text):
//   #sources tbody[data-source][data-state]       one group per source (state: the source's)
//     tr[data-job][data-state][data-connected]    one row per replica of it (state: the replica's)
//   #jobs tr[data-job][data-state][data-connected]  the jobs an agent on this node runs
//   body[data-api]      loading | ok | down;  body[data-updates]  successful /api/status reads
//   window.doppelErrors  uncaught errors and unhandled rejections of the page
"use strict";

window.doppelErrors = window.doppelErrors || [];
window.addEventListener("error", (e) => {
  window.doppelErrors.push({
    type: "error",
    message: String(e.message || (e.error && e.error.message) || "error"),
    at: (e.filename || "") + ":" + (e.lineno || 0),
  });
});
window.addEventListener("unhandledrejection", (e) => {
  const r = e.reason;
  window.doppelErrors.push({ type: "unhandledrejection", message: String((r && (r.stack || r.message)) || r) });
});

(function () {
  const STATUS_EVERY = 2000;
  const EVENTS_EVERY = 5000;
  const LAG_EVERY = 5000;
  const FETCH_TIMEOUT = 8000;
  const EVENTS_SHOWN = 20;
  const LAG_WARN = 10;
  const LAG_BAD = 60;
  const CHART_SECS = 600;

  const $ = (id) => document.getElementById(id);

  const state = {
    status: null,
    events: null,
    lag: new Map(), // key -> [[unix_secs, lag_secs], ...]
    lastOk: 0, // Date.now() of the last good /api/status
    failures: new Map(), // url -> message, while that endpoint fails
    samples: new Map(), // throughput samples: key -> [{t, bytes}]
    updates: 0,
  };

  // ---------- formatting ----------

  function bytes(n) {
    if (n === null || n === undefined || !isFinite(n)) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    let v = Number(n);
    while (Math.abs(v) >= 1024 && i < units.length - 1) {
      v /= 1024;
      i++;
    }
    return (i === 0 ? String(Math.round(v)) : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)) + " " + units[i];
  }

  function rate(n) {
    return n === null || n === undefined ? "-" : bytes(n) + "/s";
  }

  function dur(secs) {
    if (secs === null || secs === undefined || !isFinite(secs)) return "-";
    const s = Math.max(0, Number(secs));
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 90) return Math.round(s) + " s";
    if (s < 90 * 60) return Math.round(s / 60) + " min";
    if (s < 48 * 3600) return (s / 3600).toFixed(s < 10 * 3600 ? 1 : 0) + " h";
    return (s / 86400).toFixed(1) + " d";
  }

  function clock(ms) {
    const d = new Date(ms);
    const p = (x) => String(x).padStart(2, "0");
    const hms = p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
    const today = new Date();
    if (d.toDateString() === today.toDateString()) return hms;
    return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " + hms;
  }

  function num(n) {
    return n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US");
  }

  // ---------- DOM helpers ----------

  // h("td", {class: "x", data: {state: "alive"}, title: "..."}, child, "text", ...)
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === null || v === undefined || v === false) continue;
        if (k === "data") {
          for (const [dk, dv] of Object.entries(v)) if (dv !== null && dv !== undefined) el.dataset[dk] = String(dv);
        } else if (k === "class") {
          el.className = v;
        } else {
          el.setAttribute(k, String(v));
        }
      }
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      if (Array.isArray(c)) append(el, c);
      else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  // The colour class of a state word.
  function tone(word) {
    switch (word) {
      case "alive":
      case "replicating":
      case "on":
        return "ok";
      case "silent":
      case "starting":
      case "scanning":
      case "mirroring":
      case "paused":
      case "overflow":
      case "target paused":
      case "failback":
      case "failing-back":
      case "degraded":
        return "warn";
      case "failed":
      case "failing-over":
      case "disconnected":
      case "fenced":
      case "refused":
      case "not answering":
        return "bad";
      case "failed-over":
        return "over";
      default:
        return "muted";
    }
  }

  function pill(word, title) {
    return h("span", { class: "pill t-" + tone(word), title: title || null }, word || "-");
  }

  function lagClass(secs) {
    if (secs === null || secs === undefined) return "";
    return secs >= LAG_BAD ? "t-bad" : secs >= LAG_WARN ? "t-warn" : "";
  }

  // ---------- derived values ----------

  // Bytes per second of a growing counter, over the samples of the last ~15 s: recorded when
  // /api/status answers (never at render time, which would pair old counters with new times).
  function sample(key, counter, now) {
    if (counter === null || counter === undefined) return;
    let list = state.samples.get(key);
    if (!list) state.samples.set(key, (list = []));
    const last = list[list.length - 1];
    if (last && counter < last.bytes) list.length = 0; // the process restarted
    list.push({ t: now, bytes: counter });
    while (list.length > 2 && now - list[0].t > 15000) list.shift();
  }

  function recordRates(st, now) {
    const seen = new Set();
    for (const r of st.replicas || []) {
      const key = "r:" + r.source + "/" + r.job;
      seen.add(key);
      sample(key, r.bytes_received, now);
    }
    for (const j of st.jobs || []) {
      const key = "j:" + j.job;
      seen.add(key);
      sample(key, j.bytes_sent, now);
    }
    for (const k of Array.from(state.samples.keys())) if (!seen.has(k)) state.samples.delete(k);
  }

  function throughput(key) {
    const list = state.samples.get(key);
    if (!list || list.length < 2) return null;
    const a = list[0];
    const b = list[list.length - 1];
    const dt = (b.t - a.t) / 1000;
    return dt >= 1 ? Math.max(0, (b.bytes - a.bytes) / dt) : null;
  }

  function replicaWord(s) {
    if (s === "" || s === null || s === undefined) return "unseen";
    return s.startsWith("paused") ? "paused" : s;
  }

  function historyCell(hist) {
    if (!hist) return h("td", { class: "muted" }, "-");
    const span = hist.oldest_time_us ? Date.now() / 1000 - hist.oldest_time_us / 1e6 : null;
    // Paused (out of space) or cut below its setting: coloured, the reason in the tooltip.
    const cls = hist.paused ? "hist t-bad" : hist.cut_below_keep ? "hist t-warn" : "hist";
    const title =
      "kept " +
      dur(hist.keep_secs) +
      (hist.oldest_time_us ? "; oldest point " + clock(hist.oldest_time_us / 1000) : "; nothing journaled yet") +
      (hist.cut_below_keep ? "; size limit or space cut the window below its setting" : "") +
      (hist.paused ? "; out of space: the replica waits" : "");
    return h(
      "td",
      { class: cls, title, data: { history: hist.paused ? "paused" : hist.cut_below_keep ? "cut" : "ok" } },
      hist.oldest_time_us ? dur(span) : "-",
      " · ",
      bytes(hist.bytes),
      hist.paused ? " paused" : hist.cut_below_keep ? " cut" : null,
    );
  }

  function sparkline(key) {
    const pts = state.lag.get(key);
    const NS = "http://www.w3.org/2000/svg";
    const W = 80;
    const H = 18;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    if (!pts || pts.length === 0) {
      svg.setAttribute("aria-label", "no lag samples");
      return svg;
    }
    const now = pts[pts.length - 1][0];
    const from = now - CHART_SECS;
    const shown = pts.filter((p) => p[0] >= from);
    const max = Math.max(1, ...shown.map((p) => p[1]));
    const xy = shown.map((p) => [((p[0] - from) / CHART_SECS) * (W - 1), H - 1 - (p[1] / max) * (H - 3)]);
    const area = document.createElementNS(NS, "polygon");
    const line = xy.map(([x, y]) => x.toFixed(1) + "," + y.toFixed(1)).join(" ");
    area.setAttribute(
      "points",
      xy.length ? `${xy[0][0].toFixed(1)},${H} ${line} ${xy[xy.length - 1][0].toFixed(1)},${H}` : "",
    );
    area.setAttribute("class", "spark-area " + (max >= LAG_BAD ? "t-bad" : max >= LAG_WARN ? "t-warn" : ""));
    const pl = document.createElementNS(NS, "polyline");
    pl.setAttribute("points", line);
    pl.setAttribute("class", "spark-line " + (max >= LAG_BAD ? "t-bad" : max >= LAG_WARN ? "t-warn" : ""));
    const title = document.createElementNS(NS, "title");
    const peak = Math.max(...shown.map((p) => p[1]));
    title.textContent = `lag over the last ${dur(Math.min(CHART_SECS, now - shown[0][0]))}: peak ${dur(peak)}, now ${dur(
      shown[shown.length - 1][1],
    )}`;
    svg.append(title, area, pl);
    return svg;
  }

  // ---------- filtering and ordering ----------

  function matches(text) {
    const q = $("filter").value.trim().toLowerCase();
    if (!q) return true;
    return q.split(/\s+/).every((w) => text.toLowerCase().includes(w));
  }

  // Higher: needs attention sooner.
  function sourceSeverity(src, reps) {
    const order = { failed: 6, "failing-over": 6, "failing-back": 5, silent: 5, "failed-over": 4 };
    let s = order[src.state] || 0;
    for (const r of reps) {
      const w = replicaWord(r.state);
      if (w === "disconnected" || w === "paused") s = Math.max(s, 3);
      if ((r.apply_lag_seconds || 0) >= LAG_BAD) s = Math.max(s, 2);
      if (r.history && r.history.paused) s = Math.max(s, 2);
      if (overQuota(r.quota)) s = Math.max(s, 2);
    }
    if (src.error) s = Math.max(s, 3);
    return s;
  }

  function jobSeverity(j) {
    const t = tone(j.state);
    let s = t === "bad" ? 4 : t === "warn" ? 2 : 0;
    if (j.sync === "degraded") s = Math.max(s, 2);
    if ((j.lag_seconds || 0) >= LAG_BAD) s = Math.max(s, 2);
    return s;
  }

  function overQuota(q) {
    if (!q) return false;
    return (
      (q.quota_bytes != null && q.used_bytes != null && q.used_bytes > q.quota_bytes) ||
      (q.quota_files != null && q.used_files != null && q.used_files > q.quota_files)
    );
  }

  // ---------- the sources table (a target) ----------

  function quotaCell(q) {
    if (!q) return h("td", { class: "muted" }, "-");
    // One line: the most used of space and files against its limit; the rest in the tooltip.
    const lines = [];
    let worst = null;
    const one = (used, limit, fmt, what) => {
      if (used == null && limit == null) return;
      const f = limit != null && limit > 0 && used != null ? used / limit : null;
      lines.push(
        `${what}: ${used == null ? "not counted yet" : fmt(used)}` +
          (limit != null ? ` of ${fmt(limit)} (${Math.round((f || 0) * 100)} %)` : " (no limit)"),
      );
      const text = f !== null ? `${fmt(used)} · ${Math.round(f * 100)}%` : used == null ? "…" : fmt(used);
      if (!worst || (f !== null && (worst.f === null || f > worst.f))) worst = { f, text };
    };
    one(q.used_bytes, q.quota_bytes, bytes, "space");
    one(q.used_files, q.quota_files, (n) => num(n) + " files", "files");
    if (!worst) return h("td", { class: "muted" }, "-");
    const f = worst.f;
    const td = h("td", { class: "quota" + (f > 1 ? " over" : f === null ? " muted" : ""), title: lines.join("\n") }, worst.text);
    if (f !== null) {
      const fill = h("div", { class: f > 1 ? "t-bad" : f > 0.9 ? "t-warn" : "" });
      fill.style.width = Math.min(100, Math.round(f * 100)) + "%";
      td.append(h("div", { class: "bar" }, fill));
    }
    return td;
  }

  function failoverCell(src) {
    const bits = [h("span", { class: src.policy === "auto" ? "pol-auto" : "muted" }, src.policy || "-")];
    if (src.failover_in_secs !== null && src.failover_in_secs !== undefined) {
      const what = src.policy === "auto" ? "failover in " : "fails in ";
      bits.push(
        h(
          "span",
          {
            class: "countdown",
            data: { countdown: src.failover_in_secs },
            title: `until the source counts as failed, unless it is heard from (${src.missed}/${src.threshold} checks missed)`,
          },
          what + (src.failover_in_secs < 90 ? Math.ceil(src.failover_in_secs) + " s" : dur(src.failover_in_secs)),
        ),
      );
    }
    if (src.missed > 0 && src.failover_in_secs == null) {
      bits.push(h("span", { class: "muted small", title: `${src.missed} checks missed in a row; ${src.threshold} count as failed` }, `${src.missed}/${src.threshold} missed`));
    }
    if (src.error) bits.push(h("span", { class: "pill t-bad", title: src.error }, "error"));
    return h("td", { class: "failover" }, bits);
  }

  function renderSources(st) {
    const table = $("sources");
    const sources = (st.sources || []).slice();
    const replicas = st.replicas || [];
    const bySource = new Map();
    for (const r of replicas) {
      if (!bySource.has(r.source)) bySource.set(r.source, []);
      bySource.get(r.source).push(r);
    }
    // Replicas of a source the failover manager does not list (not expected): still shown.
    for (const name of bySource.keys()) {
      if (!sources.some((s) => s.source === name)) sources.push({ source: name, state: "", jobs: [] });
    }
    const groups = sources.map((src) => {
      const reps = (bySource.get(src.source) || []).slice();
      for (const j of src.jobs || []) {
        if (!reps.some((r) => r.job === j.job)) reps.push({ source: src.source, job: j.job, state: "", missing: true, failed_over: j.failed_over });
      }
      reps.sort((a, b) => a.job.localeCompare(b.job));
      return { src, reps, sev: sourceSeverity(src, reps) };
    });
    const byName = $("order").value === "name";
    groups.sort((a, b) => (byName ? 0 : b.sev - a.sev) || a.src.source.localeCompare(b.src.source));

    const onlyProblems = $("problems").checked;
    const bodies = [];
    for (const { src, reps, sev } of groups) {
      const text = [src.source, src.state, src.policy, ...reps.map((r) => r.job + " " + r.state)].join(" ");
      if (!matches(text) || (onlyProblems && sev === 0)) continue;
      const body = h("tbody", { data: { source: src.source, state: src.state || "unknown" }, class: "sev-" + sev });
      const rows = reps.length ? reps : [null];
      rows.forEach((r, i) => {
        const tr = h("tr", r ? { data: { job: r.job, state: replicaWord(r.state), connected: !!r.connected } } : null);
        if (i === 0) {
          const span = rows.length;
          const test = src.test
            ? h(
                "span",
                {
                  class: "pill t-test",
                  title: "test failover running since " + clock(src.test.started_us / 1000),
                  data: { test: "running" },
                },
                "test " + dur(Date.now() / 1000 - src.test.started_us / 1e6),
              )
            : null;
          tr.append(
            h("td", { class: "c-src", rowspan: span, title: src.source }, h("span", { class: "name" }, src.source), " ", test),
            h(
              "td",
              { rowspan: span, class: "c-state" },
              pill(src.state, src.silent_secs > 1 ? "last heard " + dur(src.silent_secs) + " ago" : null),
            ),
            Object.assign(failoverCell(src), { rowSpan: span }),
            Object.assign(quotaCell((reps.find((x) => x.quota) || {}).quota), { rowSpan: span }),
          );
        }
        if (!r) {
          tr.append(h("td", { class: "muted", colspan: 7 }, "no replicas"));
        } else {
          const key = src.source + "/" + r.job;
          const word = replicaWord(r.state);
          const tput = throughput("r:" + key);
          const lag = r.apply_lag_seconds;
          tr.append(
            h("td", { class: "c-job", title: r.job }, r.job),
            h(
              "td",
              { title: `applied ${num(r.applied)}, durable ${num(r.durable)}, epoch ${r.epoch ?? "-"}` + (r.refused ? `; ${num(r.refused)} ops refused` : "") },
              r.failed_over && word === "unseen" ? null : pill(word, r.state && r.state.startsWith("paused") ? r.state : null),
              r.failed_over ? h("span", { class: "pill t-over" }, "failed over") : null,
              r.fenced_refusals
                ? h("span", { class: "muted small", title: r.fenced_refusals + " connections of the fenced source refused" }, "⊘" + r.fenced_refusals)
                : null,
            ),
            h(
              "td",
              { class: "link" },
              h("span", { class: "dot " + (r.connected ? "on" : "off"), title: r.connected ? "connected" : "not connected" }),
              r.missing ? "-" : r.connected ? "up" : r.last_seen_secs != null ? dur(r.last_seen_secs) + " ago" : "never",
            ),
            r.connected
              ? h("td", { class: "num " + lagClass(lag), title: "capture-to-apply delay of the last op applied" }, lag != null ? dur(lag) : "-")
              : h(
                  "td",
                  { class: "num muted", title: "not connected: the lag of the last op applied before the link went down" },
                  lag != null ? dur(lag) : "-",
                ),
            h("td", { class: "chart" }, sparkline(key)),
            h("td", { class: "num", title: "received " + bytes(r.bytes_received) + " since the target started" }, r.missing ? "-" : rate(tput)),
            historyCell(r.history),
          );
        }
        body.append(tr);
      });
      bodies.push(body);
    }
    for (const b of Array.from(table.tBodies)) b.remove();
    if (bodies.length === 0) {
      const body = h("tbody", { class: "none" }, h("tr", null, h("td", { colspan: 11, class: "muted" }, "no source matches")));
      table.append(body);
    } else table.append(...bodies);
  }

  // ---------- the jobs table (an agent) ----------

  function renderJobs(st) {
    const tbody = $("jobs").tBodies[0];
    const onlyProblems = $("problems").checked;
    const byName = $("order").value === "name";
    const jobs = (st.jobs || []).slice();
    jobs.sort((a, b) => (byName ? 0 : jobSeverity(b) - jobSeverity(a)) || String(a.job).localeCompare(String(b.job)));
    const rows = [];
    for (const j of jobs) {
      const text = [j.job, j.state, j.dest, j.capture].join(" ");
      if (!matches(text) || (onlyProblems && jobSeverity(j) === 0)) continue;
      const tput = throughput("j:" + j.job);
      const lag = j.lag_seconds;
      const pending = j.pending_bytes;
      rows.push(
        h(
          "tr",
          { data: { job: j.job, state: j.state, connected: !!j.connected } },
          h("td", { class: "c-job", title: j.root ? j.job + ": " + j.root : j.job }, j.job),
          h("td", null, pill(j.state, j.detail || null)),
          h(
            "td",
            { class: "link" },
            h("span", { class: "dot " + (j.connected ? "on" : "off"), title: j.connected ? "connected" : "not connected" }),
            j.connected ? (j.ack_latency_ms != null ? j.ack_latency_ms.toFixed(j.ack_latency_ms < 10 ? 1 : 0) + " ms" : "up") : "down",
          ),
          h("td", { class: "num " + lagClass(lag) }, lag != null ? dur(lag) : "-"),
          h("td", { class: "chart" }, sparkline(j.job)),
          h(
            "td",
            {
              class: "num" + (j.spooled_bytes ? " t-warn" : ""),
              title: j.spooled_bytes ? `${bytes(j.spooled_bytes)} of it spooled to disk` : "all in memory",
              data: { spooled: j.spooled_bytes || 0 },
            },
            bytes(pending),
          ),
          h(
            "td",
            {
              class: "num",
              title:
                "sent " +
                bytes(j.bytes_sent) +
                (j.bytes_resent ? ", resent " + bytes(j.bytes_resent) : "") +
                (j.rate_limit ? "; limit " + rate(j.rate_limit) : ""),
            },
            j.bytes_sent != null ? rate(tput) : "-",
          ),
          h("td", { class: "num", title: "captured " + num(j.last_captured_seq) }, num(j.last_acked_seq)),
          h(
            "td",
            { title: j.dirty_regions ? j.dirty_regions + " dirty regions" : null },
            j.sync ? pill(j.sync) : "-",
          ),
          h("td", { class: "muted" }, j.capture || "-"),
          historyCell(j.history),
          h("td", { class: "dest", title: j.dest || null }, j.dest || "-"),
        ),
      );
    }
    if (rows.length === 0) rows.push(h("tr", null, h("td", { colspan: 12, class: "muted" }, "no job matches")));
    tbody.replaceChildren(...rows);
  }

  // ---------- summary ----------

  // A count in the summary: data-of (sources or jobs), data-chip (the state word), data-count.
  function chip(of, label, n, cls, word) {
    const el = h(
      "button",
      { type: "button", class: "chip " + cls, title: word ? "filter: " + word : null, data: { of, chip: word, count: n } },
      h("b", null, n),
      " ",
      label,
    );
    if (word) {
      el.addEventListener("click", () => {
        const f = $("filter");
        f.value = f.value === word ? "" : word;
        render();
      });
    } else el.disabled = true;
    return el;
  }

  function renderSummary(st) {
    const out = [];
    const sources = st.sources || [];
    if (sources.length) {
      const c = {};
      for (const s of sources) c[s.state] = (c[s.state] || 0) + 1;
      out.push(h("span", { class: "group" }, "Sources ", h("b", null, sources.length)));
      out.push(chip("sources", "alive", c.alive || 0, (c.alive ? "t-ok" : "zero"), "alive"));
      out.push(chip("sources", "silent", c.silent || 0, c.silent ? "t-warn" : "zero", "silent"));
      out.push(chip("sources", "failed", c.failed || 0, c.failed ? "t-bad" : "zero", "failed"));
      out.push(chip("sources", "failed over", c["failed-over"] || 0, c["failed-over"] ? "t-over" : "zero", "failed-over"));
      for (const k of ["failing-over", "failing-back", "stopped", "never-seen"]) {
        if (c[k]) out.push(chip("sources", k, c[k], "t-" + tone(k), k));
      }
    }
    // Jobs: the replicas of a target and the jobs of an agent.
    const words = [];
    for (const r of st.replicas || []) words.push(replicaWord(r.state));
    for (const j of st.jobs || []) words.push(j.state);
    if (words.length) {
      const c = {};
      for (const w of words) c[w] = (c[w] || 0) + 1;
      out.push(h("span", { class: "group" }, "Jobs ", h("b", null, words.length)));
      out.push(chip("jobs", "replicating", c.replicating || 0, c.replicating ? "t-ok" : "zero", "replicating"));
      out.push(chip("jobs", "disconnected", c.disconnected || 0, c.disconnected ? "t-bad" : "zero", "disconnected"));
      for (const [k, n] of Object.entries(c)) {
        if (k !== "replicating" && k !== "disconnected") out.push(chip("jobs", k, n, "t-" + tone(k), k));
      }
    }
    // The worst lag.
    let worst = null;
    // Replicas not connected keep the lag of their last op: not a current lag.
    for (const r of st.replicas || []) {
      if (r.connected && r.apply_lag_seconds != null && (!worst || r.apply_lag_seconds > worst.lag)) worst = { lag: r.apply_lag_seconds, key: r.source + "/" + r.job };
    }
    for (const j of st.jobs || []) {
      if (j.lag_seconds != null && (!worst || j.lag_seconds > worst.lag)) worst = { lag: j.lag_seconds, key: j.job };
    }
    out.push(
      h(
        "span",
        { class: "group worst " + (worst ? lagClass(worst.lag) : ""), title: worst ? worst.key : null, data: { worstLag: worst ? worst.lag : null } },
        "Worst lag ",
        h("b", null, worst ? dur(worst.lag) : "-"),
        worst ? h("span", { class: "muted small" }, " " + worst.key) : null,
      ),
    );
    $("summary").replaceChildren(...out);
  }

  // ---------- events ----------

  function eventTone(e) {
    const k = e.kind || "";
    if (e.status === "failed" || /fail(ed)?$|error|failed/.test(k)) return "bad";
    if (/silent|needed|started|step/.test(k)) return "warn";
    if (/done|back|connected|ended/.test(k)) return "ok";
    return "muted";
  }

  function renderEvents() {
    const list = $("events");
    const evs = ((state.events && state.events.events) || []).slice(-EVENTS_SHOWN).reverse();
    if (!evs.length) {
      list.replaceChildren(h("li", { class: "muted" }, state.events ? "no events yet" : "…"));
      return;
    }
    list.replaceChildren(
      ...evs.map((e) =>
        h(
          "li",
          { class: "ev", data: { kind: e.kind, source: e.source } },
          h("time", { datetime: new Date(e.time_us / 1000).toISOString() }, clock(e.time_us / 1000)),
          h("span", { class: "pill t-" + eventTone(e) }, e.kind),
          h("span", { class: "who" }, e.source + (e.job ? "/" + e.job : "")),
          e.step ? h("span", { class: "step" }, e.step + (e.status ? " " + e.status : "")) : e.status ? h("span", { class: "step" }, e.status) : null,
          e.millis != null ? h("span", { class: "muted small" }, " " + dur(e.millis / 1000)) : null,
          e.detail ? h("div", { class: "detail", title: e.detail }, e.detail) : null,
        ),
      ),
    );
  }

  // ---------- everything ----------

  function render() {
    const st = state.status;
    if (!st) return;
    const isTarget = (st.sources || []).length > 0 || (st.replicas || []).length > 0;
    const hasJobs = (st.jobs || []).length > 0;
    $("node-kind").textContent = isTarget ? (hasJobs ? "target + agent" : "target") : hasJobs ? "agent" : "";
    $("sources-section").hidden = !isTarget;
    $("jobs-section").hidden = !hasJobs;
    $("empty").hidden = isTarget || hasJobs;
    // Events come from a target's failover manager: an agent alone has none to show.
    const showEvents = isTarget || ((state.events && state.events.events) || []).length > 0;
    $("events-section").hidden = !showEvents;
    document.body.classList.toggle("no-events", !showEvents);
    // Text being selected in a table (to copy a name) is not pulled from under the mouse.
    const sel = window.getSelection();
    const selecting = (id) => sel && !sel.isCollapsed && $(id).contains(sel.anchorNode);
    if (isTarget && !selecting("sources")) renderSources(st);
    if (hasJobs && !selecting("jobs")) renderJobs(st);
    renderSummary(st);
    const bad = (st.sources || []).filter((s) => ["silent", "failed", "failing-over"].includes(s.state)).length +
      (st.jobs || []).filter((j) => tone(j.state) === "bad").length;
    document.title = bad ? `(${bad}) doppel` : "doppel";
  }

  function showFreshness() {
    const el = $("updated");
    const down = state.failures.size > 0;
    document.body.dataset.api = down ? "down" : state.lastOk ? "ok" : "loading";
    document.body.classList.toggle("stale", down);
    if (state.lastOk) {
      const age = (Date.now() - state.lastOk) / 1000;
      el.textContent = "updated " + clock(state.lastOk) + (age >= 5 ? " (" + dur(age) + " ago)" : "");
      el.className = "updated" + (age >= 10 ? " t-bad" : "");
    }
    const banner = $("banner");
    if (down) {
      const [url, msg] = state.failures.entries().next().value;
      banner.replaceChildren(
        h("b", null, msg.auth ? "Not authorised. " : "Cannot reach the doppel API. "),
        msg.auth
          ? "Open this page once as /?token=TOKEN (the token in the node's http_token_file). "
          : "",
        `GET ${url}: ${msg.text}. `,
        state.lastOk
          ? `Showing the data of ${clock(state.lastOk)} (${dur((Date.now() - state.lastOk) / 1000)} ago); retrying.`
          : "Retrying.",
      );
    }
    banner.hidden = !down;
  }

  class HttpError extends Error {
    constructor(status, statusText) {
      super("HTTP " + status + (statusText ? " " + statusText : ""));
      this.status = status;
    }
  }

  async function getJSON(url) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT);
    try {
      const r = await fetch(url, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "application/json" },
        signal: ctl.signal,
      });
      if (!r.ok) throw new HttpError(r.status, r.statusText);
      return await r.json();
    } finally {
      clearTimeout(timer);
    }
  }

  function poll(url, every, take) {
    const tick = async () => {
      try {
        const data = await getJSON(url);
        if (data && data.schema !== undefined && data.schema !== 1) {
          throw new Error("unknown schema " + data.schema + " (this page knows schema 1)");
        }
        take(data);
        state.failures.delete(url);
      } catch (e) {
        const text = e && e.name === "AbortError" ? "no answer in " + FETCH_TIMEOUT / 1000 + " s" : String((e && e.message) || e);
        state.failures.set(url, { text, auth: e instanceof HttpError && (e.status === 401 || e.status === 403) });
      }
      try {
        render();
        renderEvents();
      } finally {
        showFreshness();
        setTimeout(tick, every);
      }
    };
    tick();
  }

  function start() {
    // The token is turned into a cookie by the server on the first load: keep it out of the
    // address bar, the history and screenshots.
    if (new URLSearchParams(location.search).has("token")) {
      history.replaceState(null, "", location.pathname);
    }
    for (const id of ["filter", "problems", "order"]) $(id).addEventListener("input", render);
    poll("api/status", STATUS_EVERY, (d) => {
      state.status = d;
      state.lastOk = Date.now();
      recordRates(d, state.lastOk);
      state.updates++;
      document.body.dataset.updates = String(state.updates);
    });
    poll("api/events", EVENTS_EVERY, (d) => {
      state.events = d;
    });
    poll("api/lag", LAG_EVERY, (d) => {
      state.lag = new Map((d.series || []).map((s) => [s.key, s.points || []]));
    });
    setInterval(showFreshness, 1000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
