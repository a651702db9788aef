// Gateway operator dashboard: polls the admin API (and /metrics) on this origin, keeps short
// time series in the browser, draws them as inline SVG, and sends operator actions.
// Vanilla JS, no build step, no external requests. Every element a test or an operator may
// look for has a stable id or data-testid; API data goes into the page only as text nodes.
"use strict";

(() => {
  const body = document.body;
  const API = body.dataset.api || "/admin/v1";
  const METRICS = body.dataset.metrics || "/metrics";
  const HISTORY = body.dataset.history || "";
  const params = new URLSearchParams(window.location.search);
  const INTERVAL_MS = clamp(Number(params.get("interval")) || 5000, 200, 600000);
  const TOKEN_KEY = "gateway.admin.token";
  const MAX_POINTS = 800; // drift samples kept per feature (the server's hour, then live)
  const MAX_AGE_MS = 3600 * 1000; // charts show the last hour
  const TOP_FEATURES = 5; // line plots per model version
  const MAX_BARS = 30; // PSI bars per model version (breast_cancer has 30 inputs)
  const RATE_WINDOW_MS = 30000; // rates and p99 over the last 30 s of scrapes
  const SVG_NS = "http://www.w3.org/2000/svg";
  const ACTIONS = [
    // verb, label, statuses that allow it (mirrors RolloutController), css class
    ["promote", "Promote", ["canary", "paused", "awaiting_approval"], "primary"],
    ["approve", "Approve", ["awaiting_approval"], "primary"],
    ["pause", "Pause", ["canary"], ""],
    ["resume", "Resume", ["paused"], ""],
    ["rollback", "Roll back", ["canary", "paused", "awaiting_approval", "promoted"], "danger"],
  ];

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    timer: 0,
    generation: 0,
    polls: 0,
    errors: new Map(), // source -> message
    scrapes: [], // [{t, variants: Map(key -> VariantMetrics)}], oldest first
    drift: new Map(), // "model/version" -> Map(feature -> [{t, psi}])
    views: new Map(), // model name -> view
  };

  // -- small helpers ------------------------------------------------------------------------

  function clamp(x, lo, hi) {
    return Math.min(hi, Math.max(lo, x));
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "testid") node.setAttribute("data-testid", value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
  }

  function isNum(x) {
    return typeof x === "number" && Number.isFinite(x);
  }

  function fmt(x, digits) {
    return isNum(x) ? x.toFixed(digits) : "—";
  }

  function enc(part) {
    return encodeURIComponent(part);
  }

  function timeText(seconds) {
    return isNum(seconds) ? new Date(seconds * 1000).toISOString().replace(".000Z", "Z") : "—";
  }

  // -- API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(method, path, status, message) {
      super(`${method} ${path}: ${status ? status + " " : ""}${message}`);
      this.status = status;
      this.detail = message;
    }
  }

  async function request(method, path, options) {
    const opts = options || {};
    const headers = { Accept: opts.text ? "text/plain" : "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    let payload;
    if (opts.body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(opts.body);
    }
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: payload,
        cache: "no-store",
        credentials: "same-origin",
        redirect: "error",
      });
    } catch (err) {
      throw new ApiError(method, path, 0, "network error: " + err.message);
    }
    const text = await response.text();
    let data = null;
    if (!opts.text && text) {
      try {
        data = JSON.parse(text);
      } catch (err) {
        if (response.ok) throw new ApiError(method, path, response.status, "response is not JSON");
      }
    }
    if (!response.ok) {
      const message =
        data && typeof data.error === "string"
          ? data.error
          : text.slice(0, 300) || response.statusText || "request failed";
      throw new ApiError(method, path, response.status, message);
    }
    return opts.text ? text : data;
  }

  function noteError(source, err) {
    if (err) state.errors.set(source, err.message || String(err));
    else state.errors.delete(source);
  }

  function renderErrors() {
    const banner = document.getElementById("error-banner");
    banner.replaceChildren();
    for (const [source, message] of state.errors) {
      banner.append(el("div", { testid: "error", "data-source": source, text: message }));
    }
    banner.hidden = state.errors.size === 0;
  }

  function setStatus(text, kind) {
    const node = document.getElementById("connection-status");
    node.textContent = text;
    node.className = "status" + (kind ? " " + kind : "");
    node.dataset.state = kind || "idle";
  }

  // -- Prometheus text ----------------------------------------------------------------------

  // Parses the text exposition format into [{name, labels, value}] (comments skipped).
  function parseMetrics(text) {
    const samples = [];
    for (const raw of text.split("\n")) {
      const line = raw.trim();
      if (!line || line.startsWith("#")) continue;
      let i = 0;
      while (i < line.length && line[i] !== "{" && line[i] !== " ") i++;
      const name = line.slice(0, i);
      const labels = {};
      if (line[i] === "{") {
        i++;
        while (i < line.length && line[i] !== "}") {
          const eq = line.indexOf("=", i);
          if (eq < 0) break;
          const key = line.slice(i, eq).trim().replace(/^,/, "").trim();
          i = eq + 2; // skip ="
          let value = "";
          while (i < line.length && line[i] !== '"') {
            if (line[i] === "\\" && i + 1 < line.length) {
              const next = line[i + 1];
              value += next === "n" ? "\n" : next;
              i += 2;
            } else {
              value += line[i++];
            }
          }
          labels[key] = value;
          i++; // closing quote
          while (i < line.length && (line[i] === "," || line[i] === " ")) i++;
        }
        i++; // closing brace
      }
      const rest = line.slice(i).trim().split(/\s+/);
      const value = parseFloat(rest[0]);
      if (name) samples.push({ name, labels, value });
    }
    return samples;
  }

  function variantKey(model, version) {
    return model + "\u0000" + version;
  }

  function metricsByVariant(samples) {
    const variants = new Map();
    const get = (labels) => {
      const key = variantKey(labels.model, labels.version);
      if (!variants.has(key)) {
        variants.set(key, {
          requests: null,
          errors: null,
          buckets: [],
          weight: null,
          agreement: null,
          shadow: {},
          accuracy: null,
          mae: null,
          outcomeSamples: null,
        });
      }
      return variants.get(key);
    };
    for (const s of samples) {
      if (s.labels.model === undefined || s.labels.version === undefined) continue;
      switch (s.name) {
        case "gateway_variant_requests_total":
          get(s.labels).requests = s.value;
          break;
        case "gateway_variant_errors_total":
          get(s.labels).errors = s.value;
          break;
        case "gateway_request_duration_seconds_bucket":
          get(s.labels).buckets.push([parseFloat(s.labels.le), s.value]);
          break;
        case "gateway_route_weight":
          get(s.labels).weight = s.value;
          break;
        case "gateway_shadow_agreement_ratio":
          get(s.labels).agreement = s.value;
          break;
        case "gateway_shadow_requests_total":
          get(s.labels).shadow[s.labels.outcome] = s.value;
          break;
        case "gateway_outcome_accuracy":
          get(s.labels).accuracy = s.value;
          break;
        case "gateway_outcome_mae":
          get(s.labels).mae = s.value;
          break;
        case "gateway_outcome_samples_total":
          get(s.labels).outcomeSamples = s.value;
          break;
        default:
          break;
      }
    }
    for (const v of variants.values()) v.buckets.sort((a, b) => a[0] - b[0]);
    return variants;
  }

  // histogram_quantile over cumulative buckets [[le, count]], as Prometheus computes it.
  function quantile(q, buckets) {
    if (!buckets.length) return null;
    const total = buckets[buckets.length - 1][1];
    if (!(total > 0)) return null;
    const rank = q * total;
    let prevLe = 0;
    let prevCount = 0;
    for (const [le, count] of buckets) {
      if (count >= rank) {
        if (!Number.isFinite(le)) return prevLe;
        if (count === prevCount) return le;
        return prevLe + ((le - prevLe) * (rank - prevCount)) / (count - prevCount);
      }
      prevLe = Number.isFinite(le) ? le : prevLe;
      prevCount = count;
    }
    return prevLe;
  }

  function bucketDelta(now, then) {
    const before = new Map(then.map(([le, c]) => [le, c]));
    return now.map(([le, c]) => [le, c - (before.get(le) || 0)]);
  }

  // Rates and p99 for one variant from the scrapes in the window (or since start).
  function variantStats(model, version) {
    const key = variantKey(model, version);
    const scrapes = state.scrapes;
    if (!scrapes.length) return null;
    const last = scrapes[scrapes.length - 1];
    const current = last.variants.get(key);
    if (!current) return null;
    const first = scrapes.find((s) => s.variants.has(key) && s !== last);
    const out = { ...current, rate: null, errorRate: null, p99: null, p99Scope: "" };
    if (first) {
      const earlier = first.variants.get(key);
      const seconds = (last.t - first.t) / 1000;
      const dReq = current.requests - earlier.requests;
      const dErr = current.errors - earlier.errors;
      if (seconds > 0 && dReq >= 0) {
        out.rate = dReq / seconds;
        out.errorRate = dReq > 0 && dErr >= 0 ? dErr / dReq : null;
        const delta = bucketDelta(current.buckets, earlier.buckets);
        if (dReq > 0) {
          out.p99 = quantile(0.99, delta);
          out.p99Scope = "window";
        }
      }
    }
    if (out.p99 === null) {
      out.p99 = quantile(0.99, current.buckets);
      out.p99Scope = out.p99 === null ? "" : "since start";
    }
    return out;
  }

  // -- views --------------------------------------------------------------------------------

  function modelView(name) {
    let view = state.views.get(name);
    if (view) return view;
    const id = (part) => `${part}-${name}`;
    view = {
      name,
      versionsKey: "",
      badge: el("span", { class: "badge", testid: id("rollout-status"), text: "no rollout" }),
      split: el("tbody"),
      shadows: el("div", { testid: id("shadow") }),
      rollout: el("div", { testid: id("rollout") }),
      history: el("tbody"),
      reason: el("input", {
        type: "text",
        testid: id("reason"),
        placeholder: "reason (recorded in the audit trail)",
        maxlength: 2000,
      }),
      buttons: new Map(),
      actionStatus: el("div", { class: "action-status", role: "status", testid: id("action-status") }),
      weights: el("form", { class: "weights", testid: id("weights-form") }),
      drift: el("div", { testid: id("drift") }),
      driftViews: new Map(),
      outcomes: el("tbody"),
    };
    const actions = el("div", { class: "actions", testid: id("actions") }, view.reason);
    for (const [verb, label, , cls] of ACTIONS) {
      const button = el("button", {
        type: "button",
        class: cls,
        testid: `action-${verb}-${name}`,
        disabled: true,
        text: label,
        onclick: () => runAction(view, verb, label),
      });
      view.buttons.set(verb, button);
      actions.append(button);
    }
    view.weights.addEventListener("submit", (event) => {
      event.preventDefault();
      submitWeights(view);
    });
    const splitTable = el(
      "table",
      { testid: id("split") },
      el(
        "thead",
        null,
        el(
          "tr",
          null,
          ...["version", "ready", "weight", "req/s", "errors", "p99 ms", "shadow agreement"].map(
            (h) => el("th", { text: h }),
          ),
        ),
      ),
      view.split,
    );
    const historyTable = el(
      "table",
      { class: "history", testid: id("rollout-history") },
      el(
        "thead",
        null,
        el(
          "tr",
          null,
          ...["time", "action", "status", "candidate %", "actor", "reason"].map((h) =>
            el("th", { text: h }),
          ),
        ),
      ),
      view.history,
    );
    const outcomeTable = el(
      "table",
      { testid: id("outcomes") },
      el(
        "thead",
        null,
        el(
          "tr",
          null,
          ...["version", "joined", "accuracy", "MAE"].map((h) => el("th", { text: h })),
        ),
      ),
      view.outcomes,
    );
    view.root = el(
      "section",
      { class: "model", id: id("model"), testid: id("model"), "data-model": name },
      el("h2", null, name, view.badge),
      el(
        "div",
        { class: "row" },
        el(
          "div",
          null,
          el("h3", { text: "Traffic split" }),
          splitTable,
          view.shadows,
          el("h3", { text: "Set weights" }),
          view.weights,
          el("h3", { text: "Outcomes (ground truth joined by feedback)" }),
          outcomeTable,
        ),
        el(
          "div",
          null,
          el("h3", { text: "Rollout" }),
          view.rollout,
          actions,
          view.actionStatus,
          el("div", { class: "history" }, historyTable),
        ),
      ),
      view.drift,
    );
    state.views.set(name, view);
    document.getElementById("models").append(view.root);
    return view;
  }

  function renderModel(model, rollout) {
    const view = modelView(model.name);
    const versions = (model.versions || []).map((v) => v.version);
    const liveWeights = new Map();
    let hasLive = false;
    for (const version of versions) {
      const stats = variantStats(model.name, version);
      if (stats && isNum(stats.weight)) {
        liveWeights.set(version, stats.weight * 100);
        hasLive = true;
      }
    }
    // The admin API's weights (relative) are the control plane's route, applied to the
    // router; /metrics has the live, normalised split, but only for variants that have
    // served traffic. Prefer the admin API's, fall back to the live ones.
    const configured = model.weights || null;
    const configuredTotal = configured
      ? Object.values(configured).reduce((a, b) => a + (isNum(b) ? b : 0), 0)
      : 0;
    const weightOf = (version) => {
      if (configured && configuredTotal > 0) return ((configured[version] || 0) / configuredTotal) * 100;
      if (hasLive) return liveWeights.has(version) ? liveWeights.get(version) : null;
      return null;
    };

    view.split.replaceChildren();
    for (const v of model.versions || []) {
      const stats = variantStats(model.name, v.version);
      const weight = weightOf(v.version);
      const key = `${model.name}-${v.version}`;
      const fill = el("div", { class: "fill" });
      fill.style.width = `${clamp(isNum(weight) ? weight : 0, 0, 100)}%`;
      const agreement = stats && isNum(stats.agreement) ? stats.agreement : null;
      view.split.append(
        el(
          "tr",
          {
            testid: `split-row-${key}`,
            "data-version": v.version,
            "data-weight": isNum(weight) ? weight.toFixed(1) : "",
            "data-ready": v.ready ? "true" : "false",
          },
          el("td", { text: v.version }),
          el("td", {
            testid: `ready-${key}`,
            class: v.ready ? "yes" : "no",
            title: v.reason || v.state || "",
            text: v.ready ? "ready" : v.state || "not ready",
          }),
          el(
            "td",
            null,
            el(
              "div",
              { class: "weightbar" },
              el("div", { class: "track" }, fill),
              el("span", { testid: `weight-${key}`, text: isNum(weight) ? `${fmt(weight, 1)}%` : "—" }),
            ),
          ),
          el("td", { class: "num", testid: `rate-${key}`, text: fmt(stats && stats.rate, 2) }),
          el("td", {
            class: "num",
            testid: `errors-${key}`,
            text: stats && isNum(stats.errorRate) ? `${fmt(stats.errorRate * 100, 2)}%` : "—",
          }),
          el("td", {
            class: "num",
            testid: `p99-${key}`,
            title: stats ? stats.p99Scope : "",
            text: stats && isNum(stats.p99) ? fmt(stats.p99 * 1000, 2) : "—",
          }),
          el("td", {
            class: "num",
            testid: `agreement-${key}`,
            text: agreement === null ? "—" : `${fmt(agreement * 100, 1)}%`,
          }),
        ),
      );
    }
    renderOutcomes(view, model);
    renderShadows(view, model);
    renderWeightsForm(view, versions, weightOf);
    renderRollout(view, rollout);
    // Drift panels in version order, created before the reports arrive (in any order);
    // versions no longer ready lose theirs.
    const ready = (model.versions || []).filter((v) => v.ready).map((v) => v.version);
    for (const [version, d] of view.driftViews) {
      if (!ready.includes(version)) {
        d.root.remove();
        view.driftViews.delete(version);
        state.drift.delete(`${view.name}/${version}`);
      }
    }
    for (const version of ready) view.drift.append(driftView(view, version).root);
  }

  function renderOutcomes(view, model) {
    view.outcomes.replaceChildren();
    for (const v of model.versions || []) {
      const stats = variantStats(model.name, v.version);
      const key = `${model.name}-${v.version}`;
      const joined = stats && isNum(stats.outcomeSamples) ? stats.outcomeSamples : 0;
      view.outcomes.append(
        el(
          "tr",
          {
            testid: `outcome-row-${key}`,
            "data-joined": String(joined),
            "data-accuracy": stats && isNum(stats.accuracy) ? stats.accuracy.toFixed(4) : "",
          },
          el("td", { text: v.version }),
          el("td", { class: "num", text: String(joined) }),
          el("td", {
            class: "num",
            testid: `accuracy-${key}`,
            text: stats && isNum(stats.accuracy) ? `${fmt(stats.accuracy * 100, 1)}%` : "—",
          }),
          el("td", { class: "num", text: stats && isNum(stats.mae) ? fmt(stats.mae, 4) : "—" }),
        ),
      );
    }
  }

  function renderShadows(view, model) {
    view.shadows.replaceChildren();
    for (const v of model.versions || []) {
      const stats = variantStats(model.name, v.version);
      if (!stats || !Object.keys(stats.shadow).length) continue;
      const s = stats.shadow;
      view.shadows.append(
        el("div", {
          class: "muted",
          testid: `shadow-${model.name}-${v.version}`,
          text:
            `shadow ${v.version}: agreement ${isNum(stats.agreement) ? fmt(stats.agreement * 100, 1) + "%" : "—"}` +
            `, sent ${s.sent || 0}, dropped ${s.dropped || 0}, errors ${s.error || 0}`,
        }),
      );
    }
  }

  function renderWeightsForm(view, versions, weightOf) {
    const key = versions.join("\u0000");
    if (view.versionsKey === key) return; // keep what the operator is typing
    view.versionsKey = key;
    view.weights.replaceChildren();
    for (const version of versions) {
      const w = weightOf(version);
      view.weights.append(
        el(
          "label",
          null,
          version,
          el("input", {
            type: "number",
            min: 0,
            step: "any",
            name: version,
            testid: `weights-input-${view.name}-${version}`,
            value: isNum(w) ? Number(w.toFixed(2)) : 0,
          }),
        ),
      );
    }
    view.weights.append(
      el("button", { type: "submit", testid: `weights-submit-${view.name}`, text: "Apply weights" }),
    );
  }

  function renderRollout(view, rollout) {
    const status = rollout ? rollout.status : null;
    view.badge.textContent = status || "no rollout";
    view.badge.className = "badge" + (status ? " " + status : "");
    view.badge.dataset.status = status || "";
    for (const [verb, , allowed] of ACTIONS) {
      const button = view.buttons.get(verb);
      button.disabled = !status || !allowed.includes(status);
      button.title = status ? `${verb} (status ${status})` : "no rollout of this model";
    }
    view.rollout.replaceChildren();
    if (!rollout) {
      view.rollout.append(el("p", { class: "muted", text: "No rollout of this model." }));
      view.history.replaceChildren();
      return;
    }
    const steps = (rollout.policy && rollout.policy.steps) || [];
    const evaluation = rollout.last_evaluation;
    const rows = [
      ["status", status],
      ["stable → candidate", `${rollout.stable_version} → ${rollout.candidate_version}`],
      ["candidate weight", `${fmt(rollout.candidate_weight, 1)}%`],
      ["step", `${Math.min(rollout.step_index + 1, steps.length)} of ${steps.length}`],
      ["updated", `${timeText(rollout.updated_at)} by ${rollout.actor}`],
      ["reason", rollout.reason || "—"],
      [
        "last evaluation",
        evaluation ? `${evaluation.verdict} → ${evaluation.action}: ${evaluation.reason}` : "—",
      ],
    ];
    const list = el("dl", { class: "kv", testid: `rollout-details-${view.name}` });
    for (const [k, v] of rows) list.append(el("dt", { text: k }), el("dd", { text: v }));
    view.rollout.append(list);
  }

  function renderHistory(view, history) {
    view.history.replaceChildren();
    for (const t of (history || []).slice().reverse().slice(0, 50)) {
      view.history.append(
        el(
          "tr",
          { testid: `history-row-${view.name}` },
          el("td", { text: timeText(t.time) }),
          el("td", { text: t.action }),
          el("td", { text: `${t.from} → ${t.to}` }),
          el("td", { class: "num", text: `${fmt(t.from_weight, 0)} → ${fmt(t.to_weight, 0)}` }),
          el("td", { text: t.actor }),
          el("td", { text: t.reason }),
        ),
      );
    }
  }

  // -- drift ----------------------------------------------------------------------------------

  function driftView(view, version) {
    let d = view.driftViews.get(version);
    if (d) return d;
    const key = `${view.name}-${version}`;
    d = {
      verdict: el("span", { class: "badge", testid: `drift-verdict-${key}`, text: "…" }),
      info: el("span", { class: "muted", testid: `drift-info-${key}` }),
      error: el("div", { class: "drift-error", testid: `drift-error-${key}` }),
      bars: el("div", { testid: `drift-bars-${key}` }),
      sparks: el("div", { class: "sparks", testid: `drift-plot-${key}` }),
    };
    d.root = el(
      "div",
      { class: "drift", testid: `drift-${key}` },
      el("h3", null, `Drift of version ${version} `, d.verdict, " ", d.info),
      d.error,
      el("div", { class: "drift-body" }, d.bars, d.sparks),
    );
    view.driftViews.set(version, d);
    view.drift.append(d.root);
    return d;
  }

  function renderDrift(view, version, report, error) {
    const d = driftView(view, version);
    if (error) {
      // A version without a profile answers 400 with the reason: shown, not hidden.
      d.error.textContent = error.message;
      d.verdict.textContent = "unavailable";
      d.verdict.className = "badge";
      return;
    }
    d.error.textContent = "";
    d.verdict.textContent = report.verdict;
    d.verdict.className = "badge " + (report.verdict === "drift" ? "rolled_back" : "");
    d.verdict.dataset.verdict = report.verdict;
    const inputs = report.inputs || [];
    const rows = inputs.length ? inputs[0].n : 0;
    d.info.textContent = `${rows} rows in ${fmt(report.window_s, 0)} s window, baseline ${report.baseline}`;

    const seriesKey = `${view.name}/${version}`;
    if (!state.drift.has(seriesKey)) state.drift.set(seriesKey, new Map());
    const series = state.drift.get(seriesKey);
    const now = Date.now();
    for (const f of inputs.concat(report.outputs || [])) {
      if (!series.has(f.name)) series.set(f.name, []);
      const points = series.get(f.name);
      points.push({ t: now, psi: isNum(f.psi) ? f.psi : null });
      prune(points, now);
    }
    const sorted = inputs
      .filter((f) => isNum(f.psi))
      .sort((a, b) => b.psi - a.psi);
    d.bars.replaceChildren(barChart(`${view.name}-${version}`, sorted.slice(0, MAX_BARS), inputs.length));
    d.sparks.replaceChildren();
    // With an empty window (no PSI now) the features that had a PSI keep their sparkline,
    // which shows the gap, rather than vanishing.
    const plotted = sorted.length
      ? sorted
      : inputs.filter((f) => (series.get(f.name) || []).some((p) => isNum(p.psi)));
    for (const f of plotted.slice(0, TOP_FEATURES)) {
      d.sparks.append(sparkline(`${view.name}-${version}`, f, series.get(f.name) || []));
    }
    // Output drift: the model's answers against the reference, one plot per output.
    for (const f of (report.outputs || []).filter((o) => isNum(o.psi))) {
      d.sparks.append(
        sparkline(`${view.name}-${version}-output`, f, series.get(f.name) || [], `output ${f.name}`),
      );
    }
    if (!plotted.length) d.sparks.append(el("p", { class: "drift-note", text: "No PSI yet." }));
    else if (!sorted.length) d.sparks.append(el("p", { class: "drift-note", text: "No rows in the current window: no PSI." }));
  }

  function prune(points, now) {
    while (points.length && now - points[0].t > MAX_AGE_MS) points.shift();
    if (points.length > MAX_POINTS) points.splice(0, points.length - MAX_POINTS);
  }

  function clock(t) {
    const d = new Date(t);
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
  }

  // The server keeps the last hour of figures: seed the drift series with it, so a reload
  // (or a page opened late) draws the hour at once. Failing that, the page starts empty.
  async function loadHistory() {
    if (!HISTORY) return;
    let history;
    try {
      history = await request("GET", HISTORY);
    } catch (err) {
      noteError("history", err);
      return;
    }
    noteError("history", null);
    const now = Date.now();
    let samples = 0;
    for (const sample of history.samples || []) {
      const t = sample.t * 1000;
      if (now - t > MAX_AGE_MS) continue;
      samples += 1;
      for (const d of sample.drift || []) {
        const seriesKey = `${d.model}/${d.version}`;
        if (!state.drift.has(seriesKey)) state.drift.set(seriesKey, new Map());
        const series = state.drift.get(seriesKey);
        for (const [feature, psi] of d.top || []) {
          if (!series.has(feature)) series.set(feature, []);
          const points = series.get(feature);
          if (points.length && points[points.length - 1].t >= t) continue;
          points.push({ t, psi: isNum(psi) ? psi : null });
        }
      }
    }
    body.dataset.historySamples = String(samples);
  }

  function barChart(key, features, total) {
    const rowH = 12;
    const labelW = 150;
    const valueW = 44;
    const width = 420;
    const height = Math.max(rowH * features.length + 18, 30);
    const max = Math.max(0.25, ...features.map((f) => f.psi), ...features.map((f) => (isNum(f.psi_threshold) ? f.psi_threshold : 0)));
    const plotW = width - labelW - valueW;
    const chart = svg("svg", {
      width,
      height,
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": `PSI per feature, ${key}`,
      "data-testid": `drift-barchart-${key}`,
    });
    features.forEach((f, i) => {
      const y = i * rowH;
      const w = Math.max(1, (f.psi / max) * plotW);
      const tx = isNum(f.psi_threshold) && f.psi_threshold <= max ? (f.psi_threshold / max) * plotW : 0;
      const label = f.name.length > 24 ? f.name.slice(0, 23) + "…" : f.name;
      chart.append(
        svg("text", { x: labelW - 4, y: y + 9, "text-anchor": "end" }, label),
        svg(
          "rect",
          {
            class: `bar ${f.verdict || ""}`,
            x: labelW,
            y: y + 2,
            width: w.toFixed(1),
            height: rowH - 3,
            "data-feature": f.name,
            "data-psi": f.psi,
          },
          svg("title", null, `${f.name}: PSI ${fmt(f.psi, 4)}, KS ${fmt(f.ks, 4)}, ${f.verdict}`),
        ),
        // The value sits right of both the bar and the threshold mark, never on them.
        svg("text", { x: labelW + Math.max(w, tx) + 4, y: y + 9 }, fmt(f.psi, 3)),
      );
      if (tx > 0) {
        const x = labelW + tx;
        chart.append(svg("line", { class: "threshold", x1: x, x2: x, y1: y + 1, y2: y + rowH - 1 }));
      }
    });
    const note = total > features.length ? ` (top ${features.length} of ${total})` : "";
    chart.append(svg("text", { x: labelW, y: height - 4, class: "muted" }, `PSI per input feature${note}`));
    return chart;
  }

  function sparkline(key, feature, points, title) {
    const width = 300;
    const height = 84;
    const left = 36; // y-axis labels
    const right = 6;
    const top0 = 14; // title line
    const bottom = 14; // time labels
    const threshold = isNum(feature.psi_threshold) ? feature.psi_threshold : null;
    const values = points.map((p) => p.psi).filter(isNum);
    const top = Math.max(0.05, ...values, threshold || 0) * 1.1;
    const t0 = points.length ? points[0].t : 0;
    const t1 = points.length ? points[points.length - 1].t : 0;
    const span = Math.max(1, t1 - t0);
    const x = (t) => left + ((t - t0) / span) * (width - left - right);
    const y = (v) => height - bottom - (v / top) * (height - bottom - top0);
    const chart = svg("svg", {
      width,
      height,
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": `PSI over time of ${title || feature.name}`,
      "data-testid": `drift-series-${key}-${feature.name}`,
      "data-points": points.length,
    });
    chart.append(svg("rect", { class: "frame", x: 0.5, y: 0.5, width: width - 1, height: height - 1 }));
    // Axes: PSI on the left (0 and the top of the scale), local time below (first, last).
    const yAxis = svg("g", { class: "axis", "data-testid": `axis-y-${key}-${feature.name}` });
    yAxis.append(svg("line", { x1: left, x2: left, y1: top0, y2: height - bottom }));
    for (const v of [0, top / 2, top]) {
      yAxis.append(svg("text", { x: left - 3, y: y(v) + 3, "text-anchor": "end" }, fmt(v, 2)));
    }
    const xAxis = svg("g", { class: "axis", "data-testid": `axis-x-${key}-${feature.name}` });
    xAxis.append(svg("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom }));
    if (points.length) {
      xAxis.append(svg("text", { x: left, y: height - 3, "text-anchor": "start" }, clock(t0)));
      xAxis.append(svg("text", { x: width - right, y: height - 3, "text-anchor": "end" }, clock(t1)));
    }
    chart.append(yAxis, xAxis);
    if (threshold !== null) {
      chart.append(svg("line", { class: "threshold", x1: left, x2: width - right, y1: y(threshold), y2: y(threshold) }));
    }
    // An empty window has no PSI (null): the line breaks there, one segment per run of values.
    const segments = [[]];
    for (const p of points) {
      if (isNum(p.psi)) segments[segments.length - 1].push(`${x(p.t).toFixed(1)},${y(p.psi).toFixed(1)}`);
      else if (segments[segments.length - 1].length) segments.push([]);
    }
    const runs = segments.filter((c) => c.length);
    if (runs.length === 1 && runs[0].length === 1 && points.length === 1) {
      runs[0].push(`${(width - right).toFixed(1)},${runs[0][0].split(",")[1]}`);
    }
    for (const coords of runs) {
      if (coords.length === 1) coords.push(coords[0]);
      chart.append(svg("polyline", { class: "series", points: coords.join(" ") }));
    }
    chart.setAttribute("data-gaps", String(Math.max(0, runs.length - 1)));
    chart.append(
      svg("text", { x: left + 2, y: 11 }, `${title || feature.name}  PSI ${fmt(feature.psi, 4)}`),
    );
    return chart;
  }

  // -- actions --------------------------------------------------------------------------------

  function actionResult(view, ok, text) {
    view.actionStatus.textContent = text;
    view.actionStatus.className = "action-status " + (ok ? "ok" : "bad");
    view.actionStatus.dataset.ok = ok ? "true" : "false";
  }

  function reasonOf(view) {
    const reason = view.reason.value.trim();
    if (!reason) actionResult(view, false, "A reason is required: it goes into the audit trail.");
    return reason;
  }

  async function runAction(view, verb, label) {
    const reason = reasonOf(view);
    if (!reason) return;
    const path = `${API}/rollouts/${enc(view.name)}/${verb}`;
    try {
      const result = await request("POST", path, { body: { reason } });
      actionResult(view, true, `${label}: rollout is now ${result.status}.`);
      view.reason.value = "";
    } catch (err) {
      actionResult(view, false, err.message);
    }
    pollSoon();
  }

  async function submitWeights(view) {
    const reason = reasonOf(view);
    if (!reason) return;
    const weights = {};
    for (const input of view.weights.querySelectorAll("input")) {
      const value = Number(input.value);
      if (!Number.isFinite(value) || value < 0) {
        actionResult(view, false, `Weight of version ${input.name} must be a number ≥ 0.`);
        return;
      }
      weights[input.name] = value;
    }
    const path = `${API}/routes/${enc(view.name)}/weights`;
    try {
      const route = await request("PUT", path, { body: { weights, reason } });
      const text = (route.variants || []).map((v) => `${v.version}: ${v.weight}`).join(", ");
      actionResult(view, true, `Weights set (${text}).`);
      view.reason.value = "";
      view.versionsKey = ""; // refill the form from the new split
    } catch (err) {
      actionResult(view, false, err.message);
    }
    pollSoon();
  }

  // -- polling --------------------------------------------------------------------------------

  async function poll(generation) {
    if (!state.token) return;
    const [models, rollouts, metrics] = await Promise.allSettled([
      request("GET", `${API}/models`),
      request("GET", `${API}/rollouts`),
      request("GET", METRICS, { text: true }),
    ]);
    if (generation !== state.generation) return;
    noteError("models", models.status === "rejected" ? models.reason : null);
    noteError("rollouts", rollouts.status === "rejected" ? rollouts.reason : null);
    noteError("metrics", metrics.status === "rejected" ? metrics.reason : null);
    const unauthorized = [models, rollouts].some(
      (r) => r.status === "rejected" && (r.reason.status === 401 || r.reason.status === 403),
    );
    if (unauthorized) {
      // Stop: every failed attempt is audited, and retrying a bad token will not help.
      setStatus("token rejected", "bad");
      renderErrors();
      return "stop";
    }
    if (metrics.status === "fulfilled") {
      const t = Date.now();
      state.scrapes.push({ t, variants: metricsByVariant(parseMetrics(metrics.value)) });
      while (state.scrapes.length > 2 && t - state.scrapes[1].t > RATE_WINDOW_MS) state.scrapes.shift();
    }
    if (models.status === "fulfilled") {
      const byModel = new Map();
      if (rollouts.status === "fulfilled") {
        for (const r of rollouts.value.rollouts || []) byModel.set(r.model, r);
      }
      const list = models.value.models || [];
      const names = new Set(list.map((m) => m.name));
      for (const [name, view] of state.views) {
        if (!names.has(name)) {
          view.root.remove();
          state.views.delete(name);
        }
      }
      for (const model of list) renderModel(model, byModel.get(model.name) || null);
      await Promise.all(
        list.flatMap((model) => {
          const view = state.views.get(model.name);
          const jobs = (model.versions || [])
            .filter((v) => v.ready)
            .map((v) =>
              request("GET", `${API}/drift/${enc(model.name)}/${enc(v.version)}`).then(
                (report) => renderDrift(view, v.version, report, null),
                (err) => renderDrift(view, v.version, null, err),
              ),
            );
          if (byModel.has(model.name)) {
            jobs.push(
              request("GET", `${API}/rollouts/${enc(model.name)}/history`).then(
                (h) => {
                  noteError(`history:${model.name}`, null);
                  renderHistory(view, h.history);
                },
                (err) => noteError(`history:${model.name}`, err),
              ),
            );
          } else {
            renderHistory(view, []);
          }
          return jobs;
        }),
      );
      document.getElementById("empty").hidden = list.length > 0;
      if (!list.length) {
        document.getElementById("empty").textContent = "The gateway serves no models.";
        document.getElementById("empty").hidden = false;
      }
    }
    if (generation !== state.generation) return;
    state.polls += 1;
    const stamp = document.getElementById("last-update");
    stamp.textContent = `updated ${new Date().toLocaleTimeString()}`;
    stamp.dataset.polls = String(state.polls);
    setStatus(state.errors.size ? "connected, with errors" : "connected", state.errors.size ? "bad" : "ok");
    renderErrors();
    return "ok";
  }

  function schedule(delay) {
    window.clearTimeout(state.timer);
    const generation = state.generation;
    state.timer = window.setTimeout(async () => {
      let outcome;
      try {
        outcome = await poll(generation);
      } catch (err) {
        noteError("dashboard", err);
        renderErrors();
      }
      if (generation === state.generation && outcome !== "stop" && state.token) schedule(INTERVAL_MS);
    }, delay);
  }

  function pollSoon() {
    state.generation += 1;
    schedule(0);
  }

  function connect(token) {
    state.token = token;
    state.errors.clear();
    renderErrors();
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
      setStatus("connecting…", "");
      const generation = state.generation;
      loadHistory().finally(() => {
        if (generation === state.generation) pollSoon();
      });
    } else {
      sessionStorage.removeItem(TOKEN_KEY);
      state.generation += 1;
      window.clearTimeout(state.timer);
      setStatus("not connected", "");
    }
  }

  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token-input");
    const token = input.value.trim();
    input.value = ""; // the secret does not stay on screen
    connect(token);
  });
  document.getElementById("token-clear").addEventListener("click", () => connect(""));

  body.dataset.ready = "true";
  if (state.token) connect(state.token);
})();
