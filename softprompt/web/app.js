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
  generating: false, // a Try it generation is under way
  info: null,        // /api/info
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

// the help line under a field: what it does, its default, and its command-line flag
function helpLine(opt) {
  const help = el("p", { class: "help" }, opt.help);
  if (opt.kind !== "bool" && defaultText(opt) !== null) {
    help.append(" ", el("span", { class: "default", text: `(default: ${defaultText(opt)})` }));
  }
  const flag = opt.invert ? `on by default; ${opt.flag} turns it off` : opt.flag;
  help.append(" ", el("code", { class: "flag", text: flag }));
  return help;
}

const TEXTAREAS = new Set(["description", "init_text"]);
const HALF = new Set(["int", "float", "int or auto", "float or auto", "bool or auto"]);
const HALF_TEXT = new Set(["name", "author"]);

function optionField(opt) {
  const id = `opt-${opt.name}`;
  if (opt.kind === "bool") {
    const box = el("input", { type: "checkbox", id, name: opt.name, checked: opt.default === true });
    return el("div", { class: "field check wide", "data-option": opt.name },
      el("label", { for: id }, box, opt.label), helpLine(opt));
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
  } else if (TEXTAREAS.has(opt.name)) {
    input = el("textarea", { id, name: opt.name, rows: 2,
      placeholder: opt.name === "init_text" ? "a few words in the style to learn, or a path to a .txt file" : "" });
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
  const wide = !(HALF.has(opt.kind) || opt.choices || HALF_TEXT.has(opt.name)) ? " wide" : "";
  return el("div", { class: `field${wide}`, "data-option": opt.name },
    el("label", { for: id }, opt.label), input, helpLine(opt));
}

function fieldset(title, options) {
  const fs = el("fieldset", { class: "group" }, el("legend", { text: title }));
  const grid = el("div", { class: "grid" });
  for (const o of options) grid.append(optionField(o));
  fs.append(grid);
  return fs;
}

function buildForm(options, groups) {
  const host = $("#option-groups");
  host.textContent = "";
  const byName = Object.fromEntries(options.map((o) => [o.name, o]));
  // the dataset field is in the HTML (with the upload box); fill in its help from the server
  if (byName.dataset) {
    const help = $("#dataset-help");
    help.textContent = `${byName.dataset.help}; type a path, pick an uploaded one, or upload below `;
    help.append(el("code", { class: "flag", text: byName.dataset.flag }));
  }
  // the main form: the soft prompt's name, description, author and starter text, then the
  // model and the numbers most runs set (as on the Colab notebooks' forms)
  const basics = options.filter((o) => o.basic !== null && o.name !== "dataset");
  basics.sort((a, b) => a.basic - b.basic);
  const texts = (o) => o.group === "soft prompt" && o.kind === "str";
  host.append(fieldset("Soft prompt", basics.filter(texts)));
  const training = fieldset("Model and training", basics.filter((o) => !texts(o)));
  training.append(el("datalist", { id: "model-list" }));
  host.append(training);

  const more = el("details", { class: "more" }, el("summary", { text: "More options" }));
  for (const g of groups) {
    const inGroup = options.filter((o) => o.group === g && o.basic === null);
    if (!inGroup.length) continue;
    const title = g === "distillation" ? "Written prompt to distil" : g.charAt(0).toUpperCase() + g.slice(1);
    more.append(fieldset(title, inGroup));
  }
  host.append(more);
}

function formValues() {
  const values = {};
  for (const o of state.options) {
    const input = document.getElementById(`opt-${o.name}`);
    if (!input) continue;
    if (o.kind === "bool") {
      if (input.checked !== o.default) values[o.name] = input.checked;
    } else if (input.value.trim() !== "") {
      values[o.name] = input.value;
    }
  }
  return values;
}

// the fields an error message names (by their flags) are outlined, and opened if hidden
function markInvalid(message) {
  for (const n of document.querySelectorAll(".field.invalid")) n.classList.remove("invalid");
  if (!message) return;
  for (const o of state.options) {
    const flags = [o.flag, `--${o.name.replace(/_/g, "-")}`];
    if (!flags.some((f) => new RegExp(`${f}(?![\\w-])`).test(message))) continue;
    const field = document.querySelector(`.field[data-option="${o.name}"]`);
    if (!field) continue;
    field.classList.add("invalid");
    const more = field.closest("details");
    if (more) more.open = true;
  }
}

async function startRun(ev) {
  ev.preventDefault();
  const err = $("#form-error");
  showError(err, "");
  markInvalid("");
  $("#start").disabled = true;
  try {
    const check = await checkDataset();
    if (!check.ok) {
      showError(err, "Check the dataset first: no run was started.");
      $("#opt-dataset").focus();
      return;
    }
    const run = await api("POST", "/api/runs", { options: formValues() });
    await Promise.all([refreshRuns(), refreshDatasets()]);
    selectRun(run.id);
  } catch (e) {
    showError(err, e.message);
    markInvalid(e.message);
  } finally {
    $("#start").disabled = false;
  }
}

// ---------------------------------------------------------------- the dataset check

const datasetCheck = { seq: 0, timer: null, last: null };

// what train would make of the dataset field, from /api/dataset-check (softprompt.data's
// own reading), shown under the field: as the user types (after a pause), and at once when
// the field is left or a data option changes
async function checkDataset() {
  clearTimeout(datasetCheck.timer);
  const path = $("#opt-dataset").value.trim();
  const seq = ++datasetCheck.seq;
  const line = $("#dataset-check");
  const field = $("#opt-dataset").closest(".field");
  if (!path) {
    line.hidden = true;
    field.classList.remove("invalid");
    return { ok: false, message: "give a dataset" };
  }
  const checkbox = (name) => { const n = document.getElementById(`opt-${name}`); return n && n.checked ? "1" : "0"; };
  const q = new URLSearchParams({ path, recursive: checkbox("recursive"), skip_bad_files: checkbox("skip_bad_files") });
  let result;
  try {
    result = await api("GET", `/api/dataset-check?${q}`);
  } catch (e) {
    result = { ok: false, message: e.message };
  }
  if (seq !== datasetCheck.seq) return result;  // a newer check is under way
  datasetCheck.last = result;
  line.textContent = result.message;
  line.className = `check ${result.ok ? "ok" : "bad"}`;
  line.hidden = false;
  field.classList.toggle("invalid", !result.ok);
  $("#opt-dataset").setAttribute("aria-invalid", result.ok ? "false" : "true");
  return result;
}

function checkDatasetSoon() {
  clearTimeout(datasetCheck.timer);
  datasetCheck.timer = setTimeout(checkDataset, 400);
}

// ---------------------------------------------------------------- datasets and uploads

async function refreshDatasets() {
  const { datasets } = await api("GET", "/api/datasets");
  const list = $("#dataset-list");
  list.textContent = "";
  const shown = $("#datasets");
  shown.textContent = "";
  for (const d of datasets) {
    list.append(el("option", { value: d.path, text: `${d.name}: ${d.files.length} file(s)` }));
    const use = el("button", { type: "button", class: "link use", title: d.path },
      el("span", { class: "name", text: d.name }),
      el("span", { class: "size", text: ` ${d.files.length} file${d.files.length === 1 ? "" : "s"}, ${fmtBytes(d.bytes)}` }));
    use.addEventListener("click", () => { $("#opt-dataset").value = d.path; checkDataset(); });
    const del = el("button", { type: "button", class: "icon danger", "aria-label": `Delete the dataset ${d.name}`, title: "Delete this dataset", text: "Delete" });
    del.addEventListener("click", () => deleteDataset(d));
    shown.append(el("li", { "data-name": d.name }, use, del));
  }
}

function fmtBytes(n) {
  if (n < 1024) return `${n} bytes`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

async function deleteDataset(d) {
  const used = d.runs && d.runs.length
    ? `\n\n${d.runs.length} run(s) trained on it (${d.runs.join(", ")}) can no longer be resumed.` : "";
  if (!confirm(`Delete the dataset “${d.name}” and its ${d.files.length} file(s)? This cannot be undone.${used}`)) return;
  const status = $("#upload-status");
  try {
    await api("POST", `/api/datasets/${encodeURIComponent(d.name)}/delete`, {});
    status.textContent = `deleted the dataset ${d.name}`;
    status.classList.remove("error");
    if ($("#opt-dataset").value.trim() === d.path) checkDataset();
  } catch (e) {
    status.textContent = e.message;
    status.classList.add("error");
  }
  await refreshDatasets();
}

// each file is sent on its own; one refused does not stop the others, and the page says
// what became of each
async function uploadFiles() {
  const files = Array.from($("#upload-files").files || []);
  const status = $("#upload-status");
  const results = $("#upload-results");
  if (!files.length) return;
  const name = $("#upload-name").value.trim() || "uploaded";
  status.classList.remove("error");
  results.textContent = "";
  results.hidden = files.length < 2;
  let last = null, refused = 0;
  for (const [i, f] of files.entries()) {
    status.textContent = `uploading ${f.name} (${i + 1} of ${files.length})…`;
    let outcome;
    try {
      if (state.info && f.size > state.info.max_upload) {
        throw new Error(`${fmtBytes(f.size)}, more than the limit of ${fmtBytes(state.info.max_upload)} a file`);
      }
      const q = new URLSearchParams({ dataset: name, filename: f.name });
      last = await api("POST", `/api/upload?${q}`, undefined, f);
      outcome = el("li", { class: "ok", text: `${f.name}: uploaded` + (last.file !== f.name ? ` as ${last.file}` : "") });
    } catch (e) {
      refused += 1;
      // the server's line names the file: said once
      const why = e.message.replace(new RegExp(`^${f.name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}:? `), "");
      outcome = el("li", { class: "bad", text: `${f.name}: refused: ${why}` });
    }
    results.append(outcome);
  }
  $("#upload-files").value = "";
  const done = files.length - refused;
  if (last) {
    $("#opt-dataset").value = last.path;
    checkDataset();
  }
  status.textContent = last
    ? `${done} of ${files.length} file(s) uploaded to ${last.path}` + (refused ? `; ${refused} refused` : "")
    : (files.length === 1 ? results.textContent : `none of the ${files.length} files was uploaded`);
  status.classList.toggle("error", !last);  // some uploaded: the list says which were not
  if (files.length === 1) results.hidden = true;
  await refreshDatasets();
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
    if (e.message === "no such run" && id === state.selected) {  // deleted elsewhere
      state.selected = null;
      state.detail = null;
      $("#detail").hidden = true;
    }
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
    const label = o ? o.label : k;
    const shown = typeof v === "boolean" ? (v ? "on" : "off") : String(v);
    const short = shown.length > 40 ? `${shown.slice(0, 40)}…` : shown;
    meta.append(el("code", { text: `${label}: ${short}`, title: o ? `${o.flag.replace(/^--no-/, "--")} ${shown}` : shown }));
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
  $("#delete-run").hidden = d.status === "running";
  $("#resume-box").hidden = !d.can_resume;
  // a finished run goes on only to more steps than it ran (train --resume --max-steps N)
  const steps = $("#resume-steps");
  steps.placeholder = d.status === "finished" ? `over ${d.step}` : "as before";
  steps.min = d.status === "finished" ? d.step + 1 : 1;
  $("#resume").textContent = d.status === "finished" ? "Train further" : "Resume";

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

  drawDetailChart(d);

  const dl = $("#download");
  dl.hidden = !d.zip;
  if (d.zip) {
    dl.href = `/api/runs/${encodeURIComponent(d.id)}/download`;
    dl.setAttribute("download", d.zip);
    dl.textContent = `Download ${d.zip}`;
  }
  $("#try").hidden = d.status === "failed";
  // a generation under way keeps the button off, whatever the poll says
  $("#generate").disabled = state.generating || !d.can_generate;
  $("#try-hint").hidden = d.can_generate;
}

function drawDetailChart(d) {
  drawChart($("#chart"), state.metrics, d.status === "finished" ? d.total_steps : null,
    d.status === "running" ? "the loss appears here once training starts" : "no training steps were run");
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
  $("#resume").disabled = true;
  try {
    await api("POST", `/api/runs/${encodeURIComponent(state.selected)}/resume`, steps ? { max_steps: steps } : {});
    $("#resume-steps").value = "";
    state.metrics = [];  // a resume trims metrics.jsonl back to the checkpoint
    await refreshRuns();
    await refreshDetail();
  } catch (e) {
    const msg = $("#run-message");
    msg.textContent = e.message;
    msg.className = "message error";
    msg.hidden = false;
  } finally {
    $("#resume").disabled = false;
  }
}

async function deleteRun() {
  const d = state.detail;
  if (!d) return;
  const what = d.zip ? `its soft prompt (${d.zip}), checkpoint and log` : "its checkpoint and log";
  if (!confirm(`Delete the run “${d.name}” and ${what}? This cannot be undone.`)) return;
  try {
    await api("POST", `/api/runs/${encodeURIComponent(d.id)}/delete`, {});
  } catch (e) {
    const msg = $("#run-message");
    msg.textContent = e.message;
    msg.className = "message error";
    msg.hidden = false;
    return;
  }
  state.selected = null;
  state.detail = null;
  state.metrics = [];
  $("#detail").hidden = true;
  history.replaceState(null, "", location.pathname);
  await Promise.all([refreshRuns(), refreshDatasets()]);
}

// ---------------------------------------------------------------- try it

async function generateText() {
  const err = $("#gen-error");
  showError(err, "");
  const prompt = $("#prompt").value;
  const outW = $("#out-with"), outWo = $("#out-without");
  for (const n of [outW, outWo]) { n.textContent = "generating…"; n.classList.add("busy"); }
  state.generating = true;
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
    state.generating = false;
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

// x runs to the last step so far until the run is finished (the progress bar shows the total).
// The drawing is as wide as the chart is on the screen, so its text is 12 px at any width.
function drawChart(node, metrics, totalSteps, emptyText) {
  const W = Math.max(280, Math.round(node.getBoundingClientRect().width)) || 720;
  const narrow = W < 520;
  const H = narrow ? 230 : 280, L = 58, R = narrow ? 14 : 24, T = 30, B = 42;
  node.setAttribute("viewBox", `0 0 ${W} ${H}`);
  node.textContent = "";
  const train = metrics.filter((m) => typeof m.loss === "number" && isFinite(m.loss)).map((m) => [m.step, m.loss]);
  const val = metrics.filter((m) => typeof m.val_loss === "number" && isFinite(m.val_loss)).map((m) => [m.step, m.val_loss]);
  node.dataset.trainPoints = train.length;
  node.dataset.valPoints = val.length;
  if (!narrow) node.append(svg("text", { x: L, y: 18, class: "title" }, "Loss"));
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
  const xt = niceTicks(0, xMax, narrow ? 4 : 6);
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
  const lx = narrow ? L - 30 : W - R - 230;
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
  state.info = info;
  state.options = opts.options;
  buildForm(opts.options, opts.groups);
  $("#run-form").addEventListener("submit", startRun);
  $("#opt-dataset").addEventListener("input", checkDatasetSoon);
  $("#opt-dataset").addEventListener("change", checkDataset);
  for (const name of ["recursive", "skip_bad_files"]) {
    const box = document.getElementById(`opt-${name}`);
    if (box) box.addEventListener("change", () => { if ($("#opt-dataset").value.trim()) checkDataset(); });
  }
  $("#upload-files").addEventListener("change", uploadFiles);
  $("#stop").addEventListener("click", stopRun);
  $("#resume").addEventListener("click", resumeRun);
  $("#delete-run").addEventListener("click", deleteRun);
  $("#generate").addEventListener("click", generateText);
  window.addEventListener("resize", () => { if (state.detail) drawDetailChart(state.detail); });
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
