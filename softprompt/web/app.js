// softprompt ui: plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = {
  options: [],       // TrainConfig fields, from /api/options
  runs: [],
  selected: null,    // run id
  detail: null,      // the selected run's last status
  metrics: [],       // the selected run's metrics.jsonl records
  pollTimer: null,
};

// ---------------------------------------------------------------- helpers

async function api(method, path, body, raw) {
  const init = { method, headers: {} };
  if (method !== "GET") init.headers["X-Softprompt"] = "1";
  if (raw !== undefined) {
    init.body = raw;
    init.headers["Content-Type"] = "application/octet-stream";
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, init);
  let data = null;
  try { data = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) throw new Error((data && data.error) || `${resp.status} ${resp.statusText}`);
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function fmtNum(x, digits = 4) {
  if (x === null || x === undefined || !isFinite(x)) return "–";
  return Number(x).toFixed(digits);
}

function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function fmtWhen(t) {
  if (!t) return "";
  const d = new Date(t * 1000);
  return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function showError(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

// ---------------------------------------------------------------- the options form

function defaultText(opt) {
  if (opt.default === null || opt.default === undefined || opt.default === "") return null;
  return String(opt.default);
}

function optionField(opt) {
  const id = `opt-${opt.name}`;
  const help = el("p", { class: "help" }, opt.help);
  if (opt.kind !== "bool" && defaultText(opt) !== null) {
    help.append(" ", el("span", { class: "default", text: `(default: ${defaultText(opt)})` }));
  }
  if (opt.kind === "bool") {
    // on-by-default options show as their --no- flag: checked turns them off
    const box = el("input", { type: "checkbox", id, name: opt.name, checked: !opt.invert && opt.default === true });
    return el("div", { class: "field check" },
      el("label", { for: id }, box, el("code", { text: opt.flag })), help);
  }
  let input;
  if (opt.choices) {
    input = el("select", { id, name: opt.name });
    if (opt.default === null) input.append(el("option", { value: "", text: "auto" }));
    for (const c of opt.choices) {
      input.append(el("option", { value: c, text: c, selected: c === opt.default }));
    }
  } else if (opt.name === "teacher_prompt") {
    // a written prompt is paragraphs long: a text area (a .txt file's path works too)
    input = el("textarea", { id, name: opt.name, rows: 6,
      placeholder: "the written prompt to distil (memory, character card...), or a .txt file's path" });
  } else {
    const numeric = opt.kind === "int" || opt.kind === "float";
    input = el("input", {
      id, name: opt.name,
      type: numeric ? "number" : "text",
      step: opt.kind === "float" ? "any" : (opt.kind === "int" ? "1" : null),
      placeholder: defaultText(opt) ??
        (opt.name === "model" ? "SmolLM2-135M-Instruct (bundled)" : (numeric ? "auto" : "")),
    });
    if (opt.name === "model") input.setAttribute("list", "model-list");
  }
  return el("div", { class: "field" }, el("label", { for: id }, el("code", { text: opt.flag })), input, help);
}

function buildForm(options, groups) {
  const host = $("#option-groups");
  host.textContent = "";
  const byName = Object.fromEntries(options.map((o) => [o.name, o]));
  // the dataset field is in the HTML (with the upload box); fill in its help from the server
  if (byName.dataset) $("#dataset-help").textContent =
    byName.dataset.help + "; type a path, pick an uploaded one, or upload below";

  const basic = el("fieldset", { class: "group" }, el("legend", { text: "Model and training" }));
  const basics = options.filter((o) => o.basic !== null && o.name !== "dataset");
  basics.sort((a, b) => a.basic - b.basic);
  for (const o of basics) basic.append(optionField(o));
  basic.append(el("datalist", { id: "model-list" }));
  host.append(basic);

  const more = el("details", { class: "more" }, el("summary", { text: "More options" }));
  for (const g of groups) {
    const inGroup = options.filter((o) => o.group === g && o.basic === null);
    if (!inGroup.length) continue;
    const title = g === "distillation" ? "Written prompt to distil" : g.charAt(0).toUpperCase() + g.slice(1);
    const fs = el("fieldset", { class: "group" }, el("legend", { text: title }));
    for (const o of inGroup) fs.append(optionField(o));
    more.append(fs);
  }
  host.append(more);
}

function formValues() {
  const values = {};
  for (const o of state.options) {
    const input = document.getElementById(`opt-${o.name}`);
    if (!input) continue;
    if (o.kind === "bool") {
      const value = o.invert ? !input.checked : input.checked;
      if (value !== o.default) values[o.name] = value;
    } else if (input.value.trim() !== "") {
      values[o.name] = input.value;
    }
  }
  return values;
}

async function startRun(ev) {
  ev.preventDefault();
  const err = $("#form-error");
  showError(err, "");
  $("#start").disabled = true;
  try {
    const run = await api("POST", "/api/runs", { options: formValues() });
    await refreshRuns();
    selectRun(run.id);
  } catch (e) {
    showError(err, e.message);
  } finally {
    $("#start").disabled = false;
  }
}

// ---------------------------------------------------------------- datasets and uploads

async function refreshDatasets() {
  const { datasets } = await api("GET", "/api/datasets");
  const list = $("#dataset-list");
  list.textContent = "";
  for (const d of datasets) {
    list.append(el("option", { value: d.path, text: `${d.name}: ${d.files.length} file(s)` }));
  }
}

async function uploadFiles() {
  const files = Array.from($("#upload-files").files || []);
  const status = $("#upload-status");
  if (!files.length) return;
  const name = $("#upload-name").value.trim() || "uploaded";
  status.classList.remove("error");
  let last = null;
  try {
    for (const [i, f] of files.entries()) {
      status.textContent = `uploading ${f.name} (${i + 1} of ${files.length})…`;
      const q = new URLSearchParams({ dataset: name, filename: f.name });
      last = await api("POST", `/api/upload?${q}`, undefined, f);
    }
    $("#opt-dataset").value = last.path;
    status.textContent = `${files.length} file(s) in ${last.path}`;
    await refreshDatasets();
  } catch (e) {
    status.textContent = e.message;
    status.classList.add("error");
  } finally {
    $("#upload-files").value = "";
  }
}

// ---------------------------------------------------------------- runs

async function refreshRuns() {
  const { runs } = await api("GET", "/api/runs");
  state.runs = runs;
  const list = $("#runs");
  list.textContent = "";
  $("#runs-empty").hidden = runs.length > 0;
  for (const r of runs) {
    const steps = r.total_steps ? `${r.step}/${r.total_steps}` : (r.step ? `${r.step}` : "");
    const li = el("li", { "data-id": r.id, "data-status": r.status, class: r.id === state.selected ? "selected" : "" },
      el("span", { class: `badge ${r.status}`, text: r.status }),
      el("span", { class: "name", text: r.name, title: r.status === "damaged" ? r.message : r.id }),
      el("span", { class: "when", text: fmtWhen(r.created) }),
      el("span", { class: "steps", text: steps ? `step ${steps}` : "" }));
    li.addEventListener("click", () => selectRun(r.id));
    list.append(li);
  }
  const models = new Set(runs.map((r) => r.model).filter(Boolean));
  const ml = $("#model-list");
  if (ml) { ml.textContent = ""; for (const m of models) ml.append(el("option", { value: m })); }
}

function selectRun(id) {
  if (state.selected !== id) {
    state.selected = id;
    state.metrics = [];
    state.detail = null;
    $("#out-with").textContent = "";
    $("#out-without").textContent = "";
    showError($("#gen-error"), "");
  }
  history.replaceState(null, "", `#run=${encodeURIComponent(id)}`);
  for (const li of document.querySelectorAll("#runs li")) li.classList.toggle("selected", li.dataset.id === id);
  refreshDetail();
}

async function refreshDetail() {
  const id = state.selected;
  if (!id) return;
  let d;
  try {
    d = await api("GET", `/api/runs/${encodeURIComponent(id)}?since=${state.metrics.length}`);
  } catch (e) {
    return;
  }
  if (id !== state.selected) return;
  if (d.metrics_count < state.metrics.length || d.metrics_from !== state.metrics.length) {
    // metrics.jsonl was rewritten (a resume trims it): read it again from the start
    state.metrics = [];
    d = await api("GET", `/api/runs/${encodeURIComponent(id)}?since=0`);
  }
  state.metrics.push(...d.metrics);
  state.detail = d;
  renderDetail(d);
}

// what a running run is doing: its phase from status.json (train --status-file), what it
// logged last before its first step, and the latest validation loss once there is one
function runningText(d) {
  if (d.phase === "writing") return "writing the soft prompt files and the report…";
  if (d.activity) return `starting: ${d.activity}`;
  if (d.phase === "starting") return "starting";
  if (d.val_loss != null) return `training: latest validation loss ${fmtNum(d.val_loss)}`;
  return null;
}

function renderDetail(d) {
  $("#detail").hidden = false;
  $("#detail").dataset.status = d.status;
  $("#detail").dataset.id = d.id;
  $("#run-title").textContent = d.name;
  const badge = $("#run-status");
  badge.textContent = d.status;
  badge.className = `badge ${d.status}`;
  const meta = $("#run-meta");
  meta.textContent = "";
  meta.append("dataset ", el("span", { class: "path", text: d.dataset || "?" }),
    " · model ", el("span", { class: "path", text: d.model || "SmolLM2-135M-Instruct" }), " · ");
  const byName = Object.fromEntries(state.options.map((o) => [o.name, o]));
  for (const [k, v] of Object.entries(d.options || {})) {
    if (["dataset", "model", "name"].includes(k)) continue;
    const o = byName[k];
    let text = `${o ? o.flag : "--" + k} ${v}`;
    if (o && o.kind === "bool") text = o.flag;
    if (o && o.kind === "bool or auto") text = v ? o.flag : o.flag.replace(/^--/, "--no-");
    meta.append(el("code", { text }));
  }

  const msg = $("#run-message");
  let text = d.message;
  let kind = d.status === "failed" ? "error" : "info";
  if (d.status === "running") text = runningText(d);
  if (d.status === "finished") {
    kind = "ok";
    text = d.val_loss_first != null && d.val_loss != null
      ? `finished: validation loss ${fmtNum(d.val_loss_first)} → ${fmtNum(d.val_loss)}`
      : "finished";
  }
  msg.textContent = text || "";
  msg.className = `message ${kind}`;
  msg.hidden = !text;

  $("#stop").hidden = d.status !== "running";
  $("#resume-box").hidden = !d.can_resume;

  const total = d.total_steps;
  $("#stat-step").textContent = total ? `${d.step} / ${total}` : String(d.step || 0);
  $("#stat-loss").textContent = fmtNum(d.loss);
  $("#stat-val").textContent = fmtNum(d.val_loss);
  $("#stat-tps").textContent = d.tokens_per_s != null ? Math.round(d.tokens_per_s).toLocaleString() : "–";
  $("#stat-elapsed").textContent = fmtDuration(d.elapsed_s);
  $("#stat-eta").textContent = d.status === "running" ? fmtDuration(d.eta_s) : (d.status === "finished" ? "done" : "–");
  const frac = total ? Math.min(1, d.step / total) : (d.status === "finished" ? 1 : 0);
  $("#progress-bar").style.width = `${(frac * 100).toFixed(1)}%`;

  const logNode = $("#log");
  const atBottom = logNode.scrollTop + logNode.clientHeight >= logNode.scrollHeight - 4;
  logNode.textContent = (d.log || []).join("\n");
  if (atBottom) logNode.scrollTop = logNode.scrollHeight;

  drawChart($("#chart"), state.metrics, d.status === "finished" ? total : null,
    d.status === "running" ? "the loss appears here once training starts" : "no training steps were run");

  const dl = $("#download");
  dl.hidden = !d.zip;
  if (d.zip) {
    dl.href = `/api/runs/${encodeURIComponent(d.id)}/download`;
    dl.setAttribute("download", d.zip);
    dl.textContent = `Download ${d.zip}`;
  }
  $("#try").hidden = d.status === "failed";
  $("#generate").disabled = !d.can_generate;
  $("#try-hint").hidden = d.can_generate;
}

async function stopRun() {
  $("#stop").disabled = true;
  try {
    await api("POST", `/api/runs/${encodeURIComponent(state.selected)}/stop`, {});
    const msg = $("#run-message");
    msg.textContent = "stopping: train saves a checkpoint after the current step…";
    msg.className = "message info";
    msg.hidden = false;
  } catch (e) {
    alert(e.message);
  } finally {
    $("#stop").disabled = false;
  }
}

async function resumeRun() {
  const steps = $("#resume-steps").value.trim();
  state.metrics = [];  // a resume trims metrics.jsonl back to the checkpoint
  try {
    await api("POST", `/api/runs/${encodeURIComponent(state.selected)}/resume`, steps ? { max_steps: steps } : {});
    await refreshRuns();
    await refreshDetail();
  } catch (e) {
    const msg = $("#run-message");
    msg.textContent = e.message;
    msg.className = "message error";
    msg.hidden = false;
  }
}

// ---------------------------------------------------------------- try it

async function generateText() {
  const err = $("#gen-error");
  showError(err, "");
  const prompt = $("#prompt").value;
  const outW = $("#out-with"), outWo = $("#out-without");
  for (const n of [outW, outWo]) { n.textContent = "generating…"; n.classList.add("busy"); }
  $("#generate").disabled = true;
  try {
    const r = await api("POST", `/api/runs/${encodeURIComponent(state.selected)}/generate`, {
      prompt,
      max_new_tokens: $("#gen-max").value,
      temperature: $("#gen-temp").value,
      seed: $("#gen-seed").value,
    });
    for (const [node, text] of [[outW, r.with], [outWo, r.without]]) {
      node.classList.remove("busy");
      node.textContent = "";
      node.append(el("span", { class: "prompt", text: r.prompt }), el("span", { class: "continuation", text }));
    }
  } catch (e) {
    for (const n of [outW, outWo]) { n.textContent = ""; n.classList.remove("busy"); }
    showError(err, e.message);
  } finally {
    $("#generate").disabled = !(state.detail && state.detail.can_generate);
  }
}

// ---------------------------------------------------------------- the loss chart (SVG)

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const span = hi - lo;
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(12));
  return { ticks, step };
}

function thin(points, max) {
  if (points.length <= max) return points;
  const out = [];
  const every = points.length / max;
  for (let i = 0; i < max; i++) out.push(points[Math.floor(i * every)]);
  out.push(points[points.length - 1]);
  return out;
}

function fmtStep(v) {
  if (v >= 1e6 && v % 1e5 === 0) return `${v / 1e6}M`;
  if (v >= 1e4 && v % 1e3 === 0) return `${v / 1e3}k`;
  return String(v);
}

// x runs to the last step so far until the run is finished (the progress bar shows the total)
function drawChart(node, metrics, totalSteps, emptyText) {
  const W = 720, H = 280, L = 58, R = 24, T = 30, B = 42;
  node.textContent = "";
  const train = metrics.filter((m) => typeof m.loss === "number" && isFinite(m.loss)).map((m) => [m.step, m.loss]);
  const val = metrics.filter((m) => typeof m.val_loss === "number" && isFinite(m.val_loss)).map((m) => [m.step, m.val_loss]);
  node.dataset.trainPoints = train.length;
  node.dataset.valPoints = val.length;
  node.append(svg("text", { x: L, y: 18, class: "title" }, "Loss"));
  if (!train.length && !val.length) {
    node.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, emptyText));
    return;
  }
  const all = train.concat(val);
  const lastStep = Math.max(...all.map((p) => p[0]));
  const xMax = Math.max(1, totalSteps || 0, lastStep);
  let yLo = Math.min(...all.map((p) => p[1])), yHi = Math.max(...all.map((p) => p[1]));
  const pad = Math.max((yHi - yLo) * 0.08, 1e-3);
  yLo -= pad; yHi += pad;
  const xs = (v) => L + (v / xMax) * (W - L - R);
  const ys = (v) => T + (1 - (v - yLo) / (yHi - yLo)) * (H - T - B);

  const yt = niceTicks(yLo, yHi, 5);
  const ydigits = Math.max(0, -Math.floor(Math.log10(yt.step)) + (yt.step % 1 ? 1 : 0));
  for (const v of yt.ticks) {
    if (v < yLo || v > yHi) continue;
    node.append(svg("line", { x1: L, x2: W - R, y1: ys(v), y2: ys(v), class: "grid" }));
    node.append(svg("text", { x: L - 6, y: ys(v) + 4, "text-anchor": "end" }, v.toFixed(Math.min(ydigits, 4))));
  }
  const xt = niceTicks(0, xMax, 6);
  for (const v of xt.ticks) {
    if (v > xMax || v % 1) continue;
    node.append(svg("line", { x1: xs(v), x2: xs(v), y1: H - B, y2: H - B + 4, class: "axis" }));
    node.append(svg("text", { x: xs(v), y: H - B + 17, "text-anchor": "middle" }, fmtStep(v)));
  }
  node.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  node.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  node.append(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, "step"));
  node.append(svg("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(T + H - B) / 2})` }, "loss"));

  const path = (pts) => pts.map((p) => `${xs(p[0]).toFixed(1)},${ys(p[1]).toFixed(1)}`).join(" ");
  if (train.length) node.append(svg("polyline", { points: path(thin(train, 800)), class: "train" }));
  if (val.length) {
    node.append(svg("polyline", { points: path(val), class: "val" }));
    for (const p of thin(val, 200)) node.append(svg("circle", { cx: xs(p[0]), cy: ys(p[1]), r: 3, class: "valdot" }));
  }
  // legend
  const lx = W - R - 230;
  node.append(svg("line", { x1: lx, x2: lx + 22, y1: 14, y2: 14, class: "train" }));
  node.append(svg("text", { x: lx + 28, y: 18 }, "training loss"));
  node.append(svg("line", { x1: lx + 120, x2: lx + 142, y1: 14, y2: 14, class: "val" }));
  node.append(svg("circle", { cx: lx + 131, cy: 14, r: 3, class: "valdot" }));
  node.append(svg("text", { x: lx + 148, y: 18 }, "validation loss"));
}

// ---------------------------------------------------------------- start

async function poll() {
  try {
    await refreshRuns();
    await refreshDetail();
  } finally {
    const running = state.runs.some((r) => r.status === "running");
    state.pollTimer = setTimeout(poll, running ? 1000 : 3000);
  }
}

async function main() {
  const [info, opts] = await Promise.all([api("GET", "/api/info"), api("GET", "/api/options")]);
  $("#workdir").textContent = info.workdir;
  state.options = opts.options;
  buildForm(opts.options, opts.groups);
  $("#run-form").addEventListener("submit", startRun);
  $("#upload-files").addEventListener("change", uploadFiles);
  $("#stop").addEventListener("click", stopRun);
  $("#resume").addEventListener("click", resumeRun);
  $("#generate").addEventListener("click", generateText);
  await refreshDatasets();
  await refreshRuns();
  const m = /#run=([^&]+)/.exec(location.hash);
  const wanted = m && decodeURIComponent(m[1]);
  const pick = state.runs.find((r) => r.id === wanted) || state.runs.find((r) => r.status === "running") || state.runs[0];
  if (pick) selectRun(pick.id);
  document.body.dataset.ready = "1";
  state.pollTimer = setTimeout(poll, 1000);
}

main().catch((e) => {
  document.body.prepend(el("p", { class: "error", text: `the page could not start: ${e.message}` }));
});
