// The demo page: the user's files, live, through streamer-client.js. No framework.
import { connectFiles } from "/static/streamer-client.js";

const $ = (selector) => document.querySelector(selector);
const list = $("#files");
const template = $("#file-row");
const rows = new Map(); // file id → <li>

const CONNECTION_LABELS = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  expired: "Renewing session…",
  closed: "Disconnected",
};
const STATUS_LABELS = {
  pending: "Queued",
  processing: "Processing",
  ready: "Ready",
  failed: "Failed",
};

async function getToken() {
  const response = await fetch("/demo/token", { cache: "no-store", credentials: "same-origin" });
  if (!response.ok) throw new Error(`the demo token request failed (HTTP ${response.status})`);
  const { token, user_id: userId } = await response.json();
  $("#user-id").textContent = userId;
  return token;
}

// ---- rendering ---------------------------------------------------------------------

function extension(filename) {
  const name = filename.toLowerCase();
  if (name.endsWith(".tar.gz")) return "tgz";
  const dot = name.lastIndexOf(".");
  return dot > 0 ? name.slice(dot + 1, dot + 5) : "file";
}

function kind(file) {
  const type = file.file_type || "";
  const ext = extension(file.filename);
  if (type.startsWith("image/")) return "image";
  if (type.startsWith("video/")) return "video";
  if (type.startsWith("audio/")) return "audio";
  if (/zip|tar|compressed/.test(type) || ["zip", "tgz", "gz", "rar"].includes(ext)) {
    return "archive";
  }
  if (/csv|sheet|excel/.test(type) || ["csv", "xlsx", "xls"].includes(ext)) return "sheet";
  if (type === "application/pdf" || ext === "pdf") return "pdf";
  return "doc";
}

const TYPE_NAMES = {
  "application/pdf": "PDF document",
  "application/zip": "ZIP archive",
  "application/gzip": "Gzip archive",
  "application/msword": "Word document",
  "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "Word document",
  "application/vnd.ms-excel": "Excel spreadsheet",
  "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "Excel spreadsheet",
  "text/csv": "CSV table",
  "text/plain": "Text",
  "video/quicktime": "QuickTime video",
  "audio/mpeg": "MP3 audio",
};

// A short, human name for a MIME type: "JPEG image" rather than "image/jpeg".
function typeName(file) {
  const type = (file.file_type || "").toLowerCase();
  if (!type) return "";
  if (TYPE_NAMES[type]) return TYPE_NAMES[type];
  const [major, minor = ""] = type.split("/");
  if (["image", "video", "audio"].includes(major) && minor.length <= 8) {
    return `${minor.toUpperCase()} ${major}`;
  }
  return type.length <= 24 ? type : `${extension(file.filename).toUpperCase()} file`;
}

function capitalize(text) {
  return text ? text.charAt(0).toUpperCase() + text.slice(1) : "";
}

function stageText(file) {
  switch (file.status) {
    case "pending":
      return "Waiting for a worker";
    case "processing":
      return capitalize(file.processing_stage) || "Processing";
    case "ready":
      return "Processed";
    case "failed":
      return file.processing_stage ? `Failed during ${file.processing_stage}` : "Failed";
    default:
      return capitalize(file.processing_stage);
  }
}

const relative = new Intl.RelativeTimeFormat("en", { numeric: "auto", style: "short" });
const absolute = new Intl.DateTimeFormat("en", { dateStyle: "medium", timeStyle: "medium" });

function ago(iso) {
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return "";
  const seconds = Math.round((then - Date.now()) / 1000);
  if (seconds > -10) return "just now";
  if (seconds > -60) return relative.format(seconds, "second");
  if (seconds > -3600) return relative.format(Math.round(seconds / 60), "minute");
  if (seconds > -86400) return relative.format(Math.round(seconds / 3600), "hour");
  return relative.format(Math.round(seconds / 86400), "day");
}

function renderTime(time) {
  time.textContent = ago(time.dateTime);
}

function createRow(file) {
  const row = template.content.firstElementChild.cloneNode(true);
  row.dataset.fileId = file.id;
  row.classList.add("file-enter");
  row.addEventListener("animationend", () => row.classList.remove("file-enter", "file-flash"));
  return row;
}

function updateRow(row, file) {
  const previous = row.dataset.status;
  const progress = Math.max(0, Math.min(100, Number(file.progress) || 0));
  row.dataset.status = file.status;
  row.dataset.progress = String(progress);
  row.dataset.version = String(file.version);

  const icon = row.querySelector(".file-icon");
  icon.dataset.kind = kind(file);
  icon.textContent = extension(file.filename);

  const name = row.querySelector(".file-name");
  name.textContent = file.filename;
  name.title = file.filename;
  row.querySelector(".file-stage").textContent = stageText(file);
  const type = row.querySelector(".file-type");
  type.textContent = typeName(file);
  type.title = file.file_type || "";

  const error = row.querySelector(".file-error");
  error.hidden = !(file.status === "failed" && file.error_message);
  // error_message may be huge (a stack trace, a 1 MB log): show its start only.
  const message = file.error_message || "";
  error.textContent = message.length > 400 ? `${message.slice(0, 400)}…` : message;
  error.title = message.slice(0, 2000);

  const bar = row.querySelector(".bar");
  bar.setAttribute("aria-valuenow", String(progress));
  bar.setAttribute("aria-label", `${file.filename}: ${progress}%`);
  row.querySelector(".bar-fill").style.width = `${progress}%`;
  row.querySelector(".bar-value").textContent = `${progress}%`;

  const badge = row.querySelector(".badge");
  badge.dataset.status = file.status;
  badge.textContent = STATUS_LABELS[file.status] || capitalize(file.status);

  const time = row.querySelector(".file-time");
  time.dateTime = file.updated_at;
  time.title = Number.isNaN(Date.parse(file.updated_at))
    ? ""
    : `Updated ${absolute.format(new Date(file.updated_at))}`;
  renderTime(time);

  const ended = file.status === "ready" || file.status === "failed";
  if (previous && previous !== file.status && ended) {
    row.classList.remove("file-flash");
    void row.offsetWidth; // restart the animation
    row.classList.add("file-flash");
  }
}

function newestFirst(a, b) {
  const age = (Date.parse(b.created_at) || 0) - (Date.parse(a.created_at) || 0);
  return age || (a.id < b.id ? 1 : -1);
}

function renderFiles(files) {
  const sorted = Object.values(files).sort(newestFirst);

  for (const [id, row] of rows) {
    if (!(id in files)) {
      row.remove();
      rows.delete(id);
    }
  }
  sorted.forEach((file, index) => {
    let row = rows.get(file.id);
    if (!row) {
      row = createRow(file);
      rows.set(file.id, row);
    }
    if (row.dataset.version !== String(file.version)) updateRow(row, file);
    // Move only what is out of place, so progress bars keep animating.
    if (list.children[index] !== row) list.insertBefore(row, list.children[index] || null);
  });

  const count = (test) => sorted.filter(test).length;
  const active = count((f) => f.status === "pending" || f.status === "processing");
  $("#stat-total").textContent = sorted.length;
  $("#stat-active").textContent = active;
  $("#stat-ready").textContent = count((f) => f.status === "ready");
  $("#stat-failed").textContent = count((f) => f.status === "failed");
  document.title = active ? `(${active}) Files · streamer demo` : "Files · streamer demo";
  return sorted.length;
}

function renderConnection({ status, error, lastSeen }) {
  const indicator = $("#connection");
  indicator.dataset.status = status;
  indicator.querySelector(".connection-label").textContent = CONNECTION_LABELS[status] || status;
  indicator.title = lastSeen ? `Last event ${new Date(lastSeen).toLocaleTimeString()}` : "";

  const banner = $("#banner");
  const show = Boolean(error) && status !== "live";
  banner.hidden = !show;
  const next = status === "closed" ? "Reload the page to try again." : "Retrying…";
  banner.textContent = show ? `Connection problem: ${error}. ${next}` : "";
}

function renderEmpty(count, status) {
  const empty = $("#empty");
  const waiting = count === 0 && status !== "live";
  empty.hidden = count > 0;
  empty.classList.toggle("is-loading", waiting);
  const title = waiting ? "Loading your files…" : "No files yet";
  empty.querySelector(".empty-title").textContent = title;
  empty.querySelector(".empty-text").textContent = waiting
    ? ""
    : "The simulated processor adds a new upload every few seconds.";
}

// ---- filters -----------------------------------------------------------------------

const filterButtons = document.querySelectorAll("button[data-filter]");
for (const button of filterButtons) {
  button.addEventListener("click", () => {
    list.dataset.filter = button.dataset.filter;
    for (const other of filterButtons) {
      other.setAttribute("aria-pressed", String(other === button));
    }
  });
}

// ---- wiring ------------------------------------------------------------------------

const store = connectFiles({ getToken });
store.subscribe((state) => {
  const count = renderFiles(state.files);
  renderConnection(state);
  renderEmpty(count, state.status);
});

// Relative times age without events.
setInterval(() => {
  for (const time of list.querySelectorAll("time")) renderTime(time);
}, 5000);
