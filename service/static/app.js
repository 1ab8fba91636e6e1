// The export page: a form that creates exports over HTTP and a job list kept live over Socket.IO.
// Plain ES module, no build step; socket.io-client is vendored by scripts/vendor_js.sh.
import { io } from "/static/vendor/socket.io.esm.min.js";

const TOKEN_KEY = "export-service.token";
const LIST_LIMIT = 50;
const POLL_TICK_MS = 1500; // how often the fallback poller looks at active jobs
const STALE_MS = 4000; // an active job with no news for this long is fetched over HTTP
const ACK_TIMEOUT_MS = 5000;
const FORBIDDEN_OPERATORS = new Set(["$where", "$function", "$accumulator"]);
const MAX_FILTER_DEPTH = 32;
const PATH_PART = /^[^$.\0][^.\0]*$/;
// The read-only stages the service accepts in a pipeline (the server checks again).
const PIPELINE_STAGES = new Set([
  "$match", "$project", "$addFields", "$set", "$unset", "$sort", "$limit", "$skip", "$group", "$unwind",
  "$lookup", "$count", "$facet", "$bucket", "$replaceRoot", "$replaceWith", "$sample", "$sortByCount",
]);

const STATUS_LABEL = {
  queued: "Queued", fetching: "Starting", processing: "Running", finalizing: "Finishing",
  completed: "Completed", failed: "Failed", cancelled: "Cancelled", expired: "Expired",
};
const ACTIVE = new Set(["queued", "fetching", "processing", "finalizing"]);
const TERMINAL = new Set(["completed", "failed", "cancelled", "expired"]);
// A later run (`run` counts the job's claims) wins; within a run later states win, and within a state the larger
// processed count, so a stale snapshot never rolls progress back.
const RANK = { queued: 0, fetching: 1, processing: 2, finalizing: 3, completed: 4, failed: 4, cancelled: 4, expired: 5 };
// A run ends in the queue when its service stops or its lease runs out; the job's next run has a higher number.
const RANK_IN_RUN = { ...RANK, queued: 3.5 };
// Fields that describe the request, not its progress: always taken from a snapshot. They are also the only
// ones the meta line and the warnings read, so an update without any of them leaves those untouched.
const STATIC_KEYS = new Set([
  "collection", "format", "filter", "fields", "sort", "limit", "options", "file_name", "created_at", "expires_at", "warnings",
  "pipeline", "count",
]);
const EVENTS = ["export-fetching", "export-processing", "export-finalizing", "export-completed", "export-failed", "export-cancelled"];

const $ = (selector, root = document) => root.querySelector(selector);
const numberFormat = new Intl.NumberFormat();
const percentFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

const state = {
  token: "",
  collections: [],
  chosen: [], // chosen field paths, in column order
  jobs: new Map(), // id -> job (a snapshot merged with later events)
  elements: new Map(), // id -> <li>
  subscribed: new Set(),
  fetching: new Set(), // ids with an HTTP refresh in flight
  socket: null,
  listLoaded: false,
};

// Read by the browser tests; harmless for people.
const debug = { connects: 0, disconnects: 0, acks: [], polls: 0 };
window.__exportDebug = debug;

// ---------------------------------------------------------------------------------------------
// HTTP
class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `request failed (${status})`);
    this.status = status;
    this.code = error?.code || null;
    this.field = error?.field || null;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let response;
  try {
    response = await fetch(path, { method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, { code: "network", message: "The service cannot be reached. The page keeps trying." });
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (!response.ok) {
    const error = data?.error || { code: `http_${response.status}`, message: `The service answered ${response.status} ${response.statusText}.` };
    if (response.status === 401) askForToken(error.message);
    throw new ApiError(response.status, error);
  }
  return data;
}

// Download links are signed by the service and work for a few minutes. A click asks for a fresh one and
// follows that: a page left open for an hour still downloads, and neither a short link life nor a browser
// clock that differs from the service's can make the page follow a stale link (or renew one forever).
async function followDownload(event, jobId) {
  const link = event.currentTarget;
  event.preventDefault();
  try {
    const job = await api(`/api/exports/${jobId}`);
    // Retention expires a job without an event: the row learns it here, not only the banner.
    merge(job, "snapshot");
    if (!job.download_url) throw new ApiError(409, { code: "not_completed", message: `The export is ${job.status}.` });
    // Asked first: followed, an error answer (the file removed from the disk) would replace the page with its JSON.
    const probe = await fetch(job.download_url, { method: "HEAD", cache: "no-store" });
    if (!probe.ok) {
      const gone = probe.status === 410 || probe.status === 404;
      throw new ApiError(probe.status, { message: gone ? "its file is gone from the service" : `the service answered ${probe.status}` });
    }
    link.href = job.download_url;
    location.assign(job.download_url);
  } catch (error) {
    if (error.status === 404 && error.code === "not_found") {
      dropJob(jobId);  // removed meanwhile (from another tab, say)
      showBanner("That export was removed meanwhile.");
      return;
    }
    showBanner(`The file cannot be downloaded: ${error.message}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Token
function initToken() {
  const url = new URL(location.href);
  // In the fragment (#token=...), which browsers never send to the server, so it stays out of its logs. Split
  // by hand: URLSearchParams would read a "+" in a token as a space.
  const parts = url.hash.slice(1).split("&").filter(Boolean);
  const tokenPart = parts.find((part) => part.startsWith("token="));
  const fromUrl = tokenPart ? decodeURIComponent(tokenPart.slice("token=".length)) : "";
  try { state.token = localStorage.getItem(TOKEN_KEY) || ""; } catch { state.token = ""; }
  $("#token-input").value = state.token;
  if (fromUrl) {
    const rest = parts.filter((part) => part !== tokenPart).join("&"); // out of the history and of bookmarks
    history.replaceState(null, "", url.pathname + url.search + (rest ? `#${rest}` : ""));
  }
  if (fromUrl && state.token && fromUrl !== state.token) {
    // A link must not swap the token silently: exports started after it would be the link maker's, for them to
    // list and download. The link's token waits in the box until the user saves it.
    $("#token-input").value = fromUrl;
    $("#token-box").open = true;
    showBanner("This link carries another API token than the one saved in this browser. It is not used: "
      + "save it under API token only if you trust it.");
  } else if (fromUrl) {
    state.token = fromUrl;
    storeToken(fromUrl);
    $("#token-input").value = fromUrl;
  }
  $("#token-box").dataset.hasToken = String(Boolean(state.token));
}

function storeToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch { /* private mode: the token lives for this page only */ }
}

function setToken(token) {
  state.token = token;
  storeToken(token);
  $("#token-box").dataset.hasToken = String(Boolean(token));
  hideBanner();
  // A refused Socket.IO connection does not retry by itself: connect again with the new token.
  state.socket.disconnect();
  state.socket.connect();
  loadCollections();
  loadJobs();
}

function sentence(text) {
  const trimmed = String(text || "").trim().replace(/[.\s]+$/, "");
  return trimmed ? `${trimmed[0].toUpperCase()}${trimmed.slice(1)}.` : "";
}

function askForToken(message) {
  showBanner(`${sentence(message || "a valid API token is required")} Enter your API token under “API token” at the top.`);
  const box = $("#token-box");
  if (!box.open) box.open = true;
}

function showBanner(text) {
  $("#banner-text").textContent = text;
  $("#banner").hidden = false;
}

function hideBanner() {
  $("#banner").hidden = true;
}

// ---------------------------------------------------------------------------------------------
// Socket.IO
function connectSocket() {
  const socket = io({
    path: "/socket.io",
    auth: (send) => send(state.token ? { token: state.token } : {}),
    reconnectionDelay: 500,
    reconnectionDelayMax: 4000,
  });
  state.socket = socket;
  window.__exportSocket = socket;

  socket.on("connect", () => {
    debug.connects += 1;
    setConnection("live", "Live updates");
    state.subscribed.clear(); // a new connection has no rooms: subscribe to every active job again
    for (const job of state.jobs.values()) {
      if (ACTIVE.has(job.status)) subscribe(job.id);
    }
  });
  socket.on("disconnect", (reason) => {
    debug.disconnects += 1;
    state.subscribed.clear();
    setConnection("reconnecting", "Reconnecting… (polling meanwhile)");
    if (reason === "io server disconnect") socket.connect(); // the server dropped us; the client would not retry
  });
  socket.on("connect_error", (error) => {
    if (/unauthori[sz]ed|token/i.test(error?.message || "")) {
      setConnection("offline", "Not signed in");
      askForToken("The live-update connection was refused: a valid API token is required");
    } else {
      setConnection("reconnecting", "Reconnecting… (polling meanwhile)");
    }
  });
  for (const name of EVENTS) {
    socket.on(name, (data) => merge(data, "event", name === "export-fetching"));
  }
}

function setConnection(kind, text) {
  const conn = $("#conn");
  conn.dataset.state = kind;
  $("#conn-text").textContent = text;
}

function subscribe(id) {
  const socket = state.socket;
  if (!socket?.connected || state.subscribed.has(id)) return;
  state.subscribed.add(id);
  const connection = debug.connects;
  socket.timeout(ACK_TIMEOUT_MS).emit("subscribe", { id }, (err, ack) => {
    if (err || !ack?.ok) {
      state.subscribed.delete(id); // the poller retries and keeps the job fresh meanwhile
      if (ack?.error?.code === "not_found") dropJob(id);
      return;
    }
    debug.acks.push({ id, status: ack.job.status, processed: ack.job.processed, connection });
    merge(ack.job, "snapshot");
  });
}

function unsubscribe(id) {
  if (!state.subscribed.delete(id)) return;
  if (state.socket?.connected) state.socket.emit("unsubscribe", { id });
}

// ---------------------------------------------------------------------------------------------
// Job state
// restart: the update is an export-fetching event, sent when a run starts and when it writes its file again from the
// first row (a resumed file that came out short): its count is lower and it wins all the same.
function isNewer(old, next, restart) {
  if (!next.status || !(next.status in RANK)) return false;
  const runs = typeof next.run === "number" && typeof old.run === "number";
  if (runs && next.run !== old.run) return next.run > old.run;
  const rank = runs ? RANK_IN_RUN : RANK;
  const before = rank[old.status] ?? 0;
  const after = rank[next.status];
  if (after !== before) return after > before;
  if (TERMINAL.has(old.status)) return next.status === old.status;
  if (typeof next.ts === "number" && typeof old.ts === "number" && next.ts < old.ts) return false;
  if (restart && runs) return true;
  return (next.processed ?? 0) >= (old.processed ?? 0);
}

function merge(data, source, restart = false) {
  const id = data?.id;
  if (!id) return;
  let job = state.jobs.get(id);
  if (!job) {
    if (source === "event") return; // only jobs this page knows about
    job = { ...data, seenAt: Date.now() };
    state.jobs.set(id, job);
    addJobElement(job);
    afterChange(job, null);
    return;
  }
  const previous = job.status;
  const accept = isNewer(job, data, restart);
  for (const [key, value] of Object.entries(data)) {
    if (value === undefined) continue;
    if (accept || STATIC_KEYS.has(key)) job[key] = value;
  }
  if (accept) {
    job.seenAt = Date.now();
    if (job.status !== previous) delete job.actionError; // a failed cancel or removal is news only in its state
    if (source === "snapshot" && job.status !== "queued") delete job.queue_position;
    if (source === "snapshot" && !("phase" in data)) {
      // Only events say what a run is doing; a newer snapshot makes an older event's "waiting" stale.
      delete job.phase;
      delete job.waiting_seconds;
    }
  }
  renderJob(job, Object.keys(data));
  afterChange(job, previous, source);
}

function afterChange(job, previous, source) {
  if (ACTIVE.has(job.status)) {
    subscribe(job.id);
  } else {
    unsubscribe(job.id);
    if (previous && ACTIVE.has(previous)) {
      announce(`${job.file_name || "Export"}: ${STATUS_LABEL[job.status].toLowerCase()}.`);
      // Events carry progress only: fetch the final snapshot once for expiry, warnings and times.
      if (source === "event") refreshJob(job.id);
    }
  }
}

async function refreshJob(id) {
  if (state.fetching.has(id)) return;
  state.fetching.add(id);
  try {
    const snapshot = await api(`/api/exports/${encodeURIComponent(id)}`);
    const job = state.jobs.get(id);
    if (job) job.seenAt = Date.now();
    merge(snapshot, "snapshot");
  } catch (error) {
    if (error.status === 404) dropJob(id);
  } finally {
    state.fetching.delete(id);
  }
}

function dropJob(id) {
  unsubscribe(id);
  state.jobs.delete(id);
  state.elements.get(id)?.remove();
  state.elements.delete(id);
  updateListChrome();
}

async function loadJobs() {
  try {
    const data = await api(`/api/exports?limit=${LIST_LIMIT}`);
    const ids = new Set();
    for (const snap of data.exports || []) {
      ids.add(snap.id);
      merge(snap, "snapshot");
    }
    for (const id of [...state.jobs.keys()]) {
      if (!ids.has(id) && !ACTIVE.has(state.jobs.get(id).status)) dropJob(id); // deleted or beyond the list
    }
    state.listLoaded = true;
  } catch (error) {
    if (error.status !== 401) showBanner(`The export list could not be loaded: ${error.message}`);
  } finally {
    $("#jobs-loading").hidden = true;
    updateListChrome();
  }
}

// The safety net: jobs whose events stopped (connection down, a lost room) are fetched over HTTP.
async function pollActive() {
  const now = Date.now();
  for (const job of [...state.jobs.values()]) {
    if (!ACTIVE.has(job.status) || state.fetching.has(job.id)) continue;
    subscribe(job.id);
    const live = state.socket?.connected && state.subscribed.has(job.id);
    if (live && now - job.seenAt < STALE_MS) continue;
    debug.polls += 1;
    await refreshJob(job.id);
  }
}

// ---------------------------------------------------------------------------------------------
// Job list rendering
function addJobElement(job) {
  const li = $("#job-template").content.firstElementChild.cloneNode(true);
  li.dataset.jobId = job.id;
  const title = $(".job-title", li);
  title.id = `job-${job.id}-title`;
  li.setAttribute("aria-labelledby", title.id);
  $(".cancel", li).addEventListener("click", () => cancelJob(job.id));
  $(".remove", li).addEventListener("click", () => removeJob(job.id));
  $(".download", li).addEventListener("click", (event) => followDownload(event, job.id));
  state.elements.set(job.id, li);

  // Newest first: insert before the first job created earlier than this one.
  const list = $("#jobs");
  let before = null;
  for (const other of list.children) {
    const otherJob = state.jobs.get(other.dataset.jobId);
    if (otherJob && (otherJob.created_at || "") < (job.created_at || "")) { before = other; break; }
  }
  list.insertBefore(li, before);
  renderJob(job);
  updateListChrome();
}

function updateListChrome() {
  const count = state.jobs.size;
  $("#jobs-count").textContent = count ? `(${count})` : "";
  $("#jobs-empty").hidden = count > 0 || !state.listLoaded;
}

// Without `changed` (a new element) everything is drawn. Progress events arrive up to ten times a second per job
// and carry no static key, so they skip the meta line and the warnings.
function renderJob(job, changed) {
  const li = state.elements.get(job.id);
  if (!li) return;
  const full = !changed || changed.some((key) => STATIC_KEYS.has(key));
  const name = job.file_name || `${job.collection}.${job.format}`;
  li.dataset.status = job.status;
  $(".job-title", li).textContent = name;
  $(".badge", li).textContent = STATUS_LABEL[job.status] || job.status;
  if (full) renderMeta(job, $(".job-meta", li));

  const bar = $(".progress", li);
  const pct = progressPercent(job);
  bar.setAttribute("aria-label", `Progress of ${name}`);
  if (pct === null) {
    bar.removeAttribute("aria-valuenow");
    bar.dataset.indeterminate = String(ACTIVE.has(job.status) && job.status !== "queued"); // running, total unknown
  } else {
    bar.setAttribute("aria-valuenow", String(pct));
    bar.dataset.indeterminate = "false";
  }
  $(".progress-fill", bar).style.width = `${pct ?? 0}%`;
  const { parts, valueText } = progressText(job, pct);
  bar.setAttribute("aria-valuetext", valueText);
  const text = $(".progress-text", li);
  text.replaceChildren(...parts.map(([content, strong]) => {
    const span = document.createElement(strong ? "strong" : "span");
    span.textContent = content;
    return span;
  }));

  const errorBox = $(".job-error", li);
  // The job's own error, or else the last failed action on it (kept on the job: the next event redraws it).
  const message = job.status === "failed" || (job.error && job.status !== "completed") ? describeError(job.error) : job.actionError;
  errorBox.hidden = !message;
  if (message) errorBox.textContent = message;

  if (full) renderWarnings(job, $(".job-warnings", li));

  const download = $(".download", li);
  const downloadable = job.status === "completed" && job.download_url;
  download.hidden = !downloadable;
  if (downloadable) {
    download.href = job.download_url;
    download.setAttribute("download", name);
    download.setAttribute("aria-label", `Download ${name}${job.bytes ? `, ${formatBytes(job.bytes)}` : ""}`);
  } else {
    download.removeAttribute("href");
  }
  const cancel = $(".cancel", li);
  cancel.hidden = !ACTIVE.has(job.status);
  cancel.setAttribute("aria-label", `Cancel export ${name}`);
  if (!ACTIVE.has(job.status)) {
    cancel.disabled = false;
    cancel.textContent = "Cancel";
  }
  const remove = $(".remove", li);
  remove.hidden = ACTIVE.has(job.status);
  remove.setAttribute("aria-label", `Remove export ${name}${job.status === "completed" ? " and its file" : ""}`);
}

function renderWarnings(job, warnings) {
  const list = Array.isArray(job.warnings) ? job.warnings : [];
  warnings.hidden = list.length === 0;
  warnings.replaceChildren(...list.map((warning) => {
    const item = document.createElement("li");
    item.textContent = typeof warning === "string" ? warning : warning?.message || JSON.stringify(warning);
    return item;
  }));
}

function metaSeparator() {
  return Object.assign(document.createElement("span"), { className: "sep", textContent: "·" });
}

function renderMeta(job, meta) {
  const items = [job.collection, (job.format || "").toUpperCase()];
  if (job.options?.compress === "gzip") items[1] += " · gzip";
  if (job.filter && Object.keys(job.filter).length) items.push(`filter ${compactJson(job.filter, 60)}`);
  if (Array.isArray(job.pipeline)) items.push(`pipeline ${compactJson(job.pipeline, 60)}`);
  if (job.sort && Object.keys(job.sort).length) {
    items.push(`sort ${Object.entries(job.sort).map(([k, v]) => `${k} ${v === -1 ? "↓" : "↑"}`).join(", ")}`);
  }
  if (job.limit) items.push(`limit ${numberFormat.format(job.limit)}`);
  if (Array.isArray(job.fields)) items.push(`${job.fields.length} field${job.fields.length === 1 ? "" : "s"}`);
  // A run that went on from a checkpoint after a crash says so: how far the file was kept, what was read again.
  if (job.resumed_from) {
    items.push(`resumed at row ${numberFormat.format(job.resumed_from.rows)} (${numberFormat.format(job.resumed_from.reread_rows)} read again)`);
  }
  const nodes = [];
  items.filter(Boolean).forEach((item, index) => {
    if (index) nodes.push(metaSeparator());
    const span = document.createElement("span");
    if (item.startsWith("filter ") || item.startsWith("pipeline ")) span.className = "filter";
    span.textContent = item;
    nodes.push(span);
  });
  if (job.created_at) {
    nodes.push(metaSeparator());
    const time = document.createElement("time");
    time.dateTime = job.created_at;
    time.title = new Date(job.created_at).toLocaleString();
    time.textContent = formatWhen(job.created_at);
    nodes.push(time);
  }
  meta.replaceChildren(...nodes);
}

function progressPercent(job) {
  if (job.status === "completed") return 100;
  if (typeof job.percent === "number") return Math.max(0, Math.min(100, job.percent));
  if (job.total === 0) return 100;
  if (typeof job.total === "number" && job.total > 0) return Math.min(100, Math.round((1000 * (job.processed || 0)) / job.total) / 10);
  if (job.status === "queued") return 0;
  return null;
}

// Events say when a job waits on the database (a slow count, a first batch the server takes long to build):
// said after a second, so the bar reads "waiting for the database 4 s" rather than looking frozen.
function waitingText(job) {
  if (job.phase !== "waiting_for_database" || typeof job.waiting_seconds !== "number" || job.waiting_seconds < 1) return null;
  return `waiting for the database ${formatDuration(job.waiting_seconds)}`;
}

function progressText(job, pct) {
  const processed = job.processed || 0;
  const total = typeof job.total === "number" ? job.total : null;
  const rows = total === null ? `${numberFormat.format(processed)} rows` : `${numberFormat.format(processed)} of ${numberFormat.format(total)} rows`;
  const pctText = pct === null ? null : `${percentFormat.format(pct)}%`;
  const parts = [];
  let valueText;
  switch (job.status) {
    case "queued":
      parts.push([job.queue_position ? `Waiting in queue, position ${job.queue_position}` : "Waiting in queue", true]);
      valueText = "waiting in queue";
      break;
    case "fetching":
      parts.push([total === null ? "Starting…" : rows, true]);
      if (total !== null && pctText) parts.push([pctText]);
      if (waitingText(job)) parts.push([waitingText(job)]);
      valueText = total === null ? "starting" : `${rows}, ${pctText}`;
      break;
    case "processing":
    case "finalizing":
      parts.push([rows, true]);
      if (pctText) parts.push([pctText]);
      if (job.rate) parts.push([`${numberFormat.format(Math.round(job.rate))} rows/s`]);
      if (job.status === "finalizing") parts.push(["writing the file…"]);
      else if (waitingText(job)) parts.push([waitingText(job)]);
      else if (typeof job.eta_seconds === "number") parts.push([`${formatDuration(job.eta_seconds)} left`]);
      valueText = `${rows}${pctText ? `, ${pctText}` : ""}`;
      break;
    case "completed": {
      parts.push([`${numberFormat.format(processed)} rows`, true]);
      parts.push(["100%"]);
      if (job.bytes) parts.push([formatBytes(job.bytes)]);
      const seconds = durationOf(job);
      if (seconds !== null) parts.push([`took ${formatDuration(seconds)}`]);
      if (job.expires_at) parts.push([`available until ${formatWhen(job.expires_at)}`]);
      valueText = `completed, ${numberFormat.format(processed)} rows`;
      break;
    }
    case "cancelled":
      parts.push([total === null ? "Cancelled" : `Cancelled at ${rows}`, true]);
      valueText = "cancelled";
      break;
    case "failed":
      parts.push([total === null ? "Stopped" : `Stopped at ${rows}`, true]);
      valueText = "failed";
      break;
    case "expired":
      parts.push(["The file was removed when its retention period ended.", true]);
      valueText = "expired";
      break;
    default:
      parts.push([rows, true]);
      valueText = rows;
  }
  return { parts, valueText };
}

function durationOf(job) {
  if (typeof job.duration_seconds === "number") return job.duration_seconds;
  if (job.started_at && job.finished_at) return Math.max(0, (Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000);
  return null;
}

const ERROR_WORDS = {
  database_unavailable: "The database could not be reached",
  database_error: "The database reported an error",
  disk_error: "The server could not write the file",
  encoder_crashed: "The file writer stopped unexpectedly",
  too_many_attempts: "The export was interrupted too often",
  internal_error: "The service hit an internal error",
};

function describeError(error) {
  if (!error) return "The export failed for an unknown reason.";
  const lead = ERROR_WORDS[error.code];
  const message = error.message || "no details were given";
  // The service's own words may lead with what the code says already ("database error: ...").
  const detail = message.replace(/^database error:\s*/i, "");
  return lead && !message.toLowerCase().startsWith(lead.toLowerCase())
    ? `${lead}: ${detail}`
    : `The export failed: ${message}`;
}

function announce(text) {
  const region = $("#announcer");
  region.textContent = "";
  setTimeout(() => { region.textContent = text; }, 50);
}

async function cancelJob(id) {
  const li = state.elements.get(id);
  const button = $(".cancel", li);
  button.disabled = true;
  button.textContent = "Cancelling…";
  try {
    // ?if=active: a job that ended before the cancel arrived (the page may not have heard yet) is left as it is;
    // a plain DELETE would remove a finished export and its file.
    merge(await api(`/api/exports/${encodeURIComponent(id)}?if=active`, { method: "DELETE" }), "snapshot");
    // The hidden Cancel button had the keyboard's focus: the row's next action takes it, not the page's body.
    if (document.activeElement === button || document.activeElement === document.body) $(".remove:not([hidden])", li)?.focus();
  } catch (error) {
    if (error.code === "not_active") {
      const job = await api(`/api/exports/${encodeURIComponent(id)}`).catch(() => null);
      if (job) merge(job, "snapshot");
      announce(`The export had already ${job?.status || "ended"}; nothing was cancelled.`);
      return;
    }
    button.disabled = false;
    button.textContent = "Cancel";
    showJobError(id, `Cancelling failed: ${error.message}`);
  }
}

async function removeJob(id) {
  const li = state.elements.get(id);
  const button = $(".remove", li);
  button.disabled = true;
  try {
    await api(`/api/exports/${encodeURIComponent(id)}`, { method: "DELETE" });
    const next = li.nextElementSibling || li.previousElementSibling;
    const name = state.jobs.get(id)?.file_name || "Export";
    dropJob(id);
    announce(`${name} removed.`);
    ($(".remove:not([hidden]), .cancel:not([hidden]), .download:not([hidden])", next || document) || $("#jobs-heading")).focus();
  } catch (error) {
    button.disabled = false;
    if (error.status === 404) dropJob(id);
    else showJobError(id, `Removing failed: ${error.message}`);
  }
}

function showJobError(id, text) {
  const job = state.jobs.get(id);
  if (job) job.actionError = text;
  const box = $(".job-error", state.elements.get(id));
  box.hidden = false;
  box.textContent = text;
}

// ---------------------------------------------------------------------------------------------
// Formatting
function formatBytes(bytes) {
  const units = ["bytes", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return unit === 0 ? `${numberFormat.format(value)} bytes` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

function formatDuration(seconds) {
  if (seconds < 1) return "under a second";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function formatWhen(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  const sameDay = date.toDateString() === new Date().toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : date.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function compactJson(value, max) {
  const text = JSON.stringify(value);
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

// ---------------------------------------------------------------------------------------------
// Collections and fields
async function loadCollections() {
  const select = $("#collection");
  const previous = select.value;
  select.disabled = true;
  try {
    const data = await api("/api/collections");
    state.collections = data.collections || [];
    if (!state.collections.length) {
      select.replaceChildren(new Option("No exportable collection", ""));
      $("#collection-hint").textContent = "The database holds no collection this service may export.";
    } else {
      select.replaceChildren(...state.collections.map((c) =>
        new Option(c.estimated_count == null ? c.name : `${c.name} · ${numberFormat.format(c.estimated_count)} docs`, c.name)));
      select.value = state.collections.some((c) => c.name === previous) ? previous : state.collections[0].name;
    }
  } catch (error) {
    select.replaceChildren(new Option("Collections unavailable", ""));
    $("#collection-hint").textContent = `Could not load collections: ${error.message}`;
  } finally {
    select.disabled = false;
    onCollectionChange(select.value !== previous);
    if ($("#pipeline").value.trim()) checkPipeline(); // a $lookup's from is checked against this list
  }
}

function currentCollection() {
  return state.collections.find((c) => c.name === $("#collection").value) || null;
}

function onCollectionChange(reset = true) {
  const collection = currentCollection();
  const paths = collection?.fields || [];
  if (collection) {
    const count = collection.estimated_count;
    const counted = count == null
      ? "The document count did not come in time"
      : `About ${numberFormat.format(count)} document${count === 1 ? "" : "s"} (an estimate)`;
    const sampled = collection.sample_timed_out
      ? "sampling the fields did not finish in time (type paths by hand, or refresh)"
      : `${collection.fields_truncated ? "the first " : ""}${paths.length} field path${paths.length === 1 ? "" : "s"} found in a sample`;
    // A collection the server refused to count or sample (a failing view, no read right) says why.
    $("#collection-hint").textContent = collection.error
      ? `The server could not describe this collection: ${collection.error}`
      : `${counted}; ${sampled}.`;
  }
  if (reset) state.chosen = state.chosen.filter((path) => paths.includes(path));
  $("#paths-list").replaceChildren(...paths.map((path) => new Option(path)));
  renderFields();
}

function renderFields() {
  renderAvailable();
  renderChosen();
}

function choose(path) {
  if (!state.chosen.includes(path)) state.chosen.push(path);
}

function shownFields() {
  const query = $("#field-search").value.trim().toLowerCase();
  return (currentCollection()?.fields || []).filter((path) => path.toLowerCase().includes(query));
}

function renderAvailable() {
  const list = $("#field-available");
  const paths = currentCollection()?.fields || [];
  const shown = shownFields();
  if (!shown.length) {
    const item = document.createElement("li");
    item.className = "none";
    item.textContent = paths.length ? "No sampled field matches." : "No fields sampled.";
    list.replaceChildren(item);
    return;
  }
  list.replaceChildren(...shown.map((path, index) => {
    const item = document.createElement("li");
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = path;
    box.id = `avail-${index}`;
    box.checked = state.chosen.includes(path);
    box.addEventListener("change", () => {
      if (box.checked) choose(path);
      else state.chosen = state.chosen.filter((p) => p !== path);
      renderChosen();
    });
    label.append(box, document.createTextNode(path));
    item.append(label);
    return item;
  }));
}

function renderChosen(focus) {
  const list = $("#field-chosen");
  list.replaceChildren(...state.chosen.map((path, index) => {
    const item = document.createElement("li");
    const span = document.createElement("span");
    span.className = "path";
    span.textContent = path;
    item.append(span,
      tinyButton("↑", `Move ${path} up`, index === 0, () => moveChosen(index, -1)),
      tinyButton("↓", `Move ${path} down`, index === state.chosen.length - 1, () => moveChosen(index, 1)),
      tinyButton("✕", `Remove ${path}`, false, () => {
        state.chosen.splice(index, 1);
        renderFields();
        $("#field-add").focus();
      }));
    return item;
  }));
  $("#chosen-empty").hidden = state.chosen.length > 0;
  if (state.chosen.length) clearFieldError("fields");
  if (focus) {
    const [index, which] = focus;
    const buttons = list.children[index]?.querySelectorAll("button");
    const target = buttons?.[which];
    (target && !target.disabled ? target : buttons?.[which === 0 ? 1 : 0])?.focus();
  }
}

function tinyButton(text, label, disabled, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "btn tiny";
  button.textContent = text;
  button.setAttribute("aria-label", label);
  button.title = label;
  button.disabled = disabled;
  button.addEventListener("click", onClick);
  return button;
}

function moveChosen(index, delta) {
  const target = index + delta;
  if (target < 0 || target >= state.chosen.length) return;
  [state.chosen[index], state.chosen[target]] = [state.chosen[target], state.chosen[index]];
  renderChosen([target, delta < 0 ? 0 : 1]); // keep the keyboard on the same arrow of the moved field
}

function addCustomField() {
  const input = $("#field-add");
  const path = input.value.trim();
  if (!path) return;
  if (!isPath(path)) {
    setFieldError("fields", `“${path}” is not a field path. Use names joined by dots, such as assignee.name.`, input);
    return;
  }
  choose(path);
  input.value = "";
  input.removeAttribute("aria-invalid");
  renderFields();
}

function isPath(path) {
  return typeof path === "string" && path.length > 0 && path.length <= 1024 && path.split(".").every((part) => PATH_PART.test(part));
}

// ---------------------------------------------------------------------------------------------
// Filter validation (immediate feedback; the server validates again)
function checkFilter() {
  const area = $("#filter");
  const status = $("#filter-status");
  const text = area.value.trim();
  let result;
  if (!text) {
    result = { ok: true, value: {}, message: "No filter: every document is exported." };
  } else {
    try {
      const value = JSON.parse(text);
      if (value === null || typeof value !== "object" || Array.isArray(value)) {
        result = { ok: false, message: "The filter must be a JSON object, such as {\"status\": \"open\"}." };
      } else {
        const problem = filterProblem(value, 0);
        const keys = Object.keys(value).length;
        result = problem
          ? { ok: false, message: problem }
          : { ok: true, value, message: keys ? `Valid filter on ${keys} top-level key${keys === 1 ? "" : "s"}.` : "Empty filter: every document is exported." };
      }
    } catch (error) {
      result = { ok: false, message: `Not valid JSON: ${cleanJsonError(error.message, text)}` };
    }
  }
  status.dataset.kind = result.ok ? "ok" : "error";
  status.textContent = result.message;
  if (result.ok) area.removeAttribute("aria-invalid");
  else area.setAttribute("aria-invalid", "true");
  return result;
}

function filterProblem(value, depth) {
  if (depth > MAX_FILTER_DEPTH) return `The filter is nested deeper than ${MAX_FILTER_DEPTH} levels.`;
  if (Array.isArray(value)) {
    for (const item of value) {
      const problem = filterProblem(item, depth + 1);
      if (problem) return problem;
    }
  } else if (value && typeof value === "object") {
    for (const [key, item] of Object.entries(value)) {
      if (FORBIDDEN_OPERATORS.has(key)) return `The operator ${key} is not allowed: it would run code on the database server.`;
      const problem = filterProblem(item, depth + 1);
      if (problem) return problem;
    }
  }
  return null;
}

// Pipeline validation: the server's rules, with the same paths in the messages (pipeline.2.$out).
function checkPipeline() {
  const area = $("#pipeline");
  const status = $("#pipeline-status");
  const text = area.value.trim();
  let result;
  if (!text) {
    result = { ok: false, empty: true, message: "Type a pipeline: a JSON list of stages such as [{\"$match\": {}}]." };
  } else {
    try {
      const value = JSON.parse(text);
      const problem = pipelineProblem(value, "pipeline", 0);
      const stages = Array.isArray(value) ? value.length : 0;
      result = problem ? { ok: false, message: problem } : { ok: true, value, message: `Valid pipeline of ${stages} stage${stages === 1 ? "" : "s"}.` };
    } catch (error) {
      result = { ok: false, message: `Not valid JSON: ${cleanJsonError(error.message, text)}` };
    }
  }
  if (result.empty) delete status.dataset.kind; // nothing typed yet is no error
  else status.dataset.kind = result.ok ? "ok" : "error";
  status.textContent = result.message;
  if (result.ok || result.empty) area.removeAttribute("aria-invalid");
  else area.setAttribute("aria-invalid", "true");
  return result;
}

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function pipelineProblem(value, where, depth) {
  if (!Array.isArray(value)) return `${where} must be a list of stages, such as [{"$match": {}}].`;
  for (const [index, stage] of value.entries()) {
    const path = `${where}.${index}`;
    if (!isObject(stage) || Object.keys(stage).length !== 1) return `${path}: a stage is an object with exactly one key, such as {"$match": {…}}.`;
    const [name, body] = Object.entries(stage)[0];
    const problem = stageProblem(name, body, `${path}.${name}`, depth + 2);
    if (problem) return problem;
  }
  return null;
}

function stageProblem(name, body, where, depth) {
  if (!PIPELINE_STAGES.has(name)) {
    const why = name === "$out" || name === "$merge" ? " (it writes to the database)" : "";
    return `${where}: the stage ${name} is not allowed in an export${why}.`;
  }
  if (name === "$facet" && isObject(body)) {
    for (const [key, sub] of Object.entries(body)) {
      const problem = pipelineProblem(sub, `${where}.${key}`, depth + 1);
      if (problem) return problem;
    }
    return null;
  }
  if (name === "$lookup") {
    if (!isObject(body)) return `${where}: $lookup must be an object naming the collection in from.`;
    const exportable = state.collections.map((c) => c.name);
    if (typeof body.from !== "string" || (exportable.length && !exportable.includes(body.from))) {
      return `${where}.from: ${JSON.stringify(body.from ?? null)} is not an exportable collection.`;
    }
    for (const [key, item] of Object.entries(body)) {
      const problem = key === "pipeline" ? pipelineProblem(item, `${where}.pipeline`, depth + 1) : operatorProblem(item, `${where}.${key}`, depth + 1);
      if (problem) return problem;
    }
    return null;
  }
  return operatorProblem(body, where, depth);
}

function operatorProblem(value, where, depth) {
  // + 2 for the pipeline list and the stage object: a $match may nest as deep as a filter.
  if (depth > MAX_FILTER_DEPTH + 2) return `${where} is nested deeper than ${MAX_FILTER_DEPTH} levels.`;
  const entries = Array.isArray(value) ? [...value.entries()] : isObject(value) ? Object.entries(value) : [];
  for (const [key, item] of entries) {
    if (FORBIDDEN_OPERATORS.has(key)) return `${where}.${key}: the operator ${key} is not allowed: it would run code on the database server.`;
    const problem = operatorProblem(item, `${where}.${key}`, depth + 1);
    if (problem) return problem;
  }
  return null;
}

// ---------------------------------------------------------------------------------------------
// The Find / Pipeline tabs (WAI-ARIA tabs: arrow keys move between them)
function pipelineMode() {
  return $("#tab-pipeline").getAttribute("aria-selected") === "true";
}

function selectTab(tab, focus = false) {
  for (const other of document.querySelectorAll('#export-form [role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(`#${other.getAttribute("aria-controls")}`).hidden = !selected;
  }
  if (focus) tab.focus();
  if (pipelineMode()) checkPipeline();
}

function initTabs() {
  const tabs = [...document.querySelectorAll('#export-form [role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      const index = tabs.indexOf(tab);
      const next = step ? tabs[(index + step + tabs.length) % tabs.length] : event.key === "Home" ? tabs[0] : event.key === "End" ? tabs.at(-1) : null;
      if (!next) return;
      event.preventDefault();
      selectTab(next, true);
    });
  }
}

function cleanJsonError(message, text) {
  // Chromium says "... at position 12 (line 1 column 13)"; older engines give only the position.
  const match = /position (\d+)/.exec(message);
  if (match && !/line \d+/.test(message)) {
    const before = text.slice(0, Number(match[1]));
    const line = before.split("\n").length;
    const column = Number(match[1]) - before.lastIndexOf("\n");
    return `${message.replace(/^JSON\.parse: /, "")} (line ${line}, column ${column})`;
  }
  return message.replace(/^JSON\.parse: /, "");
}

// ---------------------------------------------------------------------------------------------
// Sort keys
let sortCounter = 0;

function addSortRow(path = "", direction = "1") {
  sortCounter += 1;
  const n = sortCounter;
  const item = document.createElement("li");
  const fieldLabel = Object.assign(document.createElement("label"), { className: "sr-only", htmlFor: `sort-field-${n}`, textContent: "Sort field" });
  const input = Object.assign(document.createElement("input"), { type: "text", id: `sort-field-${n}`, value: path, placeholder: "field, e.g. createdAt", autocomplete: "off", spellcheck: false });
  input.setAttribute("list", "paths-list");
  input.className = "sort-field";
  const dirLabel = Object.assign(document.createElement("label"), { className: "sr-only", htmlFor: `sort-dir-${n}`, textContent: "Direction" });
  const select = Object.assign(document.createElement("select"), { id: `sort-dir-${n}`, className: "sort-dir" });
  select.append(new Option("Ascending ↑", "1"), new Option("Descending ↓", "-1"));
  select.value = direction;
  const remove = tinyButton("✕", "Remove this sort key", false, () => {
    item.remove();
    clearFieldError("sort");
    $("#sort-add").focus();
  });
  input.addEventListener("input", () => { input.removeAttribute("aria-invalid"); clearFieldError("sort"); });
  item.append(fieldLabel, input, dirLabel, select, remove);
  $("#sort-list").append(item);
  return input;
}

function readSort() {
  const sort = {};
  for (const item of $("#sort-list").children) {
    const input = $(".sort-field", item);
    const path = input.value.trim();
    if (!path) continue;
    if (!isPath(path)) return { error: `“${path}” is not a field path.`, input };
    if (path in sort) return { error: `${path} is listed twice.`, input };
    sort[path] = Number($(".sort-dir", item).value);
  }
  return { sort };
}

// ---------------------------------------------------------------------------------------------
// Form
const FIELD_TARGETS = {
  collection: "#collection", format: "#format-csv", filter: "#filter", fields: "#field-add", sort: "#sort-list input",
  limit: "#limit", filename: "#filename", pipeline: "#pipeline", count: "#pipeline-count", "options.csv.delimiter": "#csv-delimiter", "options.json.mode": "#json-mode",
  "options.compress": "#compress", "options.parquet.compression": "#parquet-compression",
  "options.parquet.row_group_size": "#parquet-row-group",
};
// Formats that compress their content themselves: gzip around them is not offered.
const SELF_COMPRESSED = new Set(["xlsx", "parquet"]);

function setFieldError(name, message, control) {
  const box = $(`#${name}-error`);
  if (box) {
    box.hidden = false;
    box.textContent = message;
  }
  if (control) {
    control.setAttribute("aria-invalid", "true");
    if (box) control.setAttribute("aria-describedby", `${box.id} ${control.getAttribute("aria-describedby") || ""}`.trim());
  }
}

function clearFieldError(name) {
  const box = $(`#${name}-error`);
  if (box) box.hidden = true;
}

function showFormError(message, fieldName) {
  const box = $("#form-error");
  box.hidden = false;
  box.textContent = message;
  // A pipeline error names a path inside it (pipeline.2.$out): the pipeline box is the control to fix.
  const target = FIELD_TARGETS[fieldName] || FIELD_TARGETS[(fieldName || "").split(".")[0]];
  const control = target ? $(target) : null;
  if (control) {
    const panel = control.closest('[role="tabpanel"]');
    if (panel?.hidden) selectTab($(`[aria-controls="${panel.id}"]`));
    if (control.id !== "filter" && control.id !== "pipeline") control.setAttribute("aria-invalid", "true");
    control.focus();
  }
}

function clearFormError() {
  $("#form-error").hidden = true;
  for (const element of document.querySelectorAll("#export-form [aria-invalid]")) {
    if (element.id !== "filter" && element.id !== "pipeline") element.removeAttribute("aria-invalid");
  }
}

function selectedFormat() {
  return $("input[name=format]:checked").value;
}

function onFormatChange() {
  const format = selectedFormat();
  $("#csv-options").hidden = format !== "csv";
  $("#json-options").hidden = format !== "json" && format !== "ndjson";
  $("#json-envelope-label").hidden = format !== "json";
  $("#parquet-options").hidden = format !== "parquet";
  const compress = $("#compress");
  const packed = SELF_COMPRESSED.has(format);
  if (packed) compress.value = "none";
  compress.disabled = packed;
  $("#compress-hint").hidden = !packed;
}

function readFind(body) {
  const filter = checkFilter();
  if (!filter.ok) return { error: `Fix the filter: ${filter.message}`, field: "filter" };
  if (Object.keys(filter.value).length) body.filter = filter.value;

  if ($("#fields-some").checked) {
    if (!state.chosen.length) {
      const message = "Choose at least one field, or pick “All fields”.";
      setFieldError("fields", message);
      return { error: message, field: "fields" };
    }
    body.fields = [...state.chosen];
  }

  const sort = readSort();
  if (sort.error) {
    setFieldError("sort", sort.error, sort.input);
    sort.input.focus();
    return { error: `Fix the sort: ${sort.error}` };
  }
  if (Object.keys(sort.sort).length) body.sort = sort.sort;
  return {};
}

function readPipeline(body) {
  const pipeline = checkPipeline();
  if (!pipeline.ok) return { error: `Fix the pipeline: ${pipeline.message}`, field: "pipeline" };
  body.pipeline = pipeline.value;
  body.count = $("#pipeline-count").checked;
  return {};
}

function buildRequest() {
  const collection = $("#collection").value;
  if (!collection) return { error: "Choose a collection first.", field: "collection" };
  const format = selectedFormat();
  const body = { collection, format };
  const query = pipelineMode() ? readPipeline(body) : readFind(body);
  if (query.error) return query;

  const limitText = $("#limit").value.trim();
  if (limitText) {
    const limit = Number(limitText);
    if (!Number.isInteger(limit) || limit < 0) return { error: "The limit must be a whole number, 0 or more.", field: "limit" };
    if (limit > 0) body.limit = limit;
  }

  const options = {};
  if (format === "csv") {
    options.csv = {
      delimiter: $("#csv-delimiter").value,
      header: $("#csv-header").checked,
      bom: $("#csv-bom").checked,
      escape_formulas: $("#csv-escape").checked,
    };
  } else if (format === "json" || format === "ndjson") {
    options.json = { mode: $("#json-mode").value, envelope: format === "json" && $("#json-envelope").checked };
  } else if (format === "parquet") {
    const rows = Number($("#parquet-row-group").value);
    if (!Number.isInteger(rows) || rows < 1000 || rows > 1000000) {
      return { error: "Rows per row group must be a whole number from 1,000 to 1,000,000.", field: "options.parquet.row_group_size" };
    }
    options.parquet = { compression: $("#parquet-compression").value, row_group_size: rows };
  }
  options.compress = SELF_COMPRESSED.has(format) ? "none" : $("#compress").value;
  body.options = options;

  const filename = $("#filename").value.trim();
  if (filename) body.filename = filename;
  return { body };
}

async function submitExport(event) {
  event.preventDefault();
  clearFormError();
  const request = buildRequest();
  if (request.error) {
    showFormError(request.error, request.field);
    return;
  }
  const button = $("#start");
  if (button.getAttribute("aria-disabled") === "true") return;  // started already; the answer is on its way
  // aria-disabled, not disabled: a disabled button drops the keyboard's focus to the page's body.
  button.setAttribute("aria-disabled", "true");
  button.setAttribute("aria-busy", "true");
  button.textContent = "Starting…";
  try {
    const snapshot = await api("/api/exports", { method: "POST", body: request.body });
    merge(snapshot, "snapshot");
    announce(`Export ${snapshot.file_name || ""} started.`);
    // The list may be out of sight (below the form on a narrow screen, above a scrolled one): bring the new row in.
    state.elements.get(snapshot.id)?.scrollIntoView({ block: "nearest", behavior: "smooth" });
  } catch (error) {
    const prefix = error.status === 429 ? "Too many exports are running" : "The export could not start";
    showFormError(`${prefix}: ${error.message}`, error.field);
  } finally {
    button.removeAttribute("aria-disabled");
    button.removeAttribute("aria-busy");
    button.textContent = "Start export";
  }
}

function initForm() {
  const form = $("#export-form");
  form.addEventListener("submit", submitExport);
  $("#collection").addEventListener("change", () => onCollectionChange(true));
  $("#collections-refresh").addEventListener("click", loadCollections);
  for (const radio of document.querySelectorAll("input[name=fields-mode]")) {
    radio.addEventListener("change", () => {
      $("#fields-picker").hidden = !$("#fields-some").checked;
      clearFieldError("fields");
    });
  }
  $("#field-search").addEventListener("input", renderAvailable);
  $("#fields-select-all").addEventListener("click", () => {
    for (const path of shownFields()) choose(path);  // those the search shows: "all" of what the user sees
    renderFields();
  });
  $("#fields-select-none").addEventListener("click", () => {
    state.chosen = [];
    renderFields();
  });
  $("#field-add-btn").addEventListener("click", addCustomField);
  $("#field-add").addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); addCustomField(); }
  });
  $("#filter").addEventListener("input", checkFilter);
  $("#pipeline").addEventListener("input", checkPipeline);
  initTabs();
  $("#sort-add").addEventListener("click", () => addSortRow().focus());
  for (const radio of document.querySelectorAll("input[name=format]")) radio.addEventListener("change", onFormatChange);
  for (const control of form.querySelectorAll("input, select, textarea")) {
    if (control.id === "filter" || control.id === "pipeline") continue;
    control.addEventListener("input", () => control.removeAttribute("aria-invalid"));
  }
  $("#jobs-refresh").addEventListener("click", loadJobs);
  $("#banner-close").addEventListener("click", hideBanner);
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setToken($("#token-input").value.trim());
    $("#token-box").open = false;
  });
  $("#token-clear").addEventListener("click", () => {
    $("#token-input").value = "";
    setToken("");
  });
  onFormatChange();
  checkFilter();
}

// ---------------------------------------------------------------------------------------------
initToken();
initForm();
connectSocket();
loadCollections();
loadJobs();
setInterval(pollActive, POLL_TICK_MS);
// Jobs started or removed in another tab or by mexport meanwhile: the list is read again when the page is seen again.
document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") loadJobs(); });
