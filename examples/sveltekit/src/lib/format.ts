// How a file reads on screen: its kind, type, stage and age, in words.
import type { ConnectionStatus, StreamedFile } from "streamer-client";

export const STATUS_LABELS: Record<string, string> = {
  pending: "Queued",
  processing: "Processing",
  ready: "Ready",
  failed: "Failed",
};

export const CONNECTION_LABELS: Record<ConnectionStatus, string> = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  expired: "Renewing session…",
  closed: "Disconnected",
};

export type Filter = "all" | "active" | "ready" | "failed";

export function inFilter(file: StreamedFile, filter: Filter): boolean {
  if (filter === "all") return true;
  if (filter === "active") return file.status === "pending" || file.status === "processing";
  return file.status === filter;
}

export function isFinished(file: StreamedFile): boolean {
  return file.status === "ready" || file.status === "failed";
}

export function extension(filename: string): string {
  const name = filename.toLowerCase();
  if (name.endsWith(".tar.gz")) return "tgz";
  const dot = name.lastIndexOf(".");
  return dot > 0 ? name.slice(dot + 1, dot + 5) : "file";
}

const MEDIA: Record<string, string[]> = {
  image: ["jpg", "jpeg", "png", "gif", "heic", "webp", "svg"],
  video: ["mp4", "mov", "webm", "mkv"],
  audio: ["mp3", "wav", "flac", "m4a", "ogg"],
};

/** What the icon shows: from the MIME type, or the extension when there is none. */
export function kind(file: StreamedFile): string {
  const type = file.file_type ?? "";
  const ext = extension(file.filename);
  for (const [media, extensions] of Object.entries(MEDIA)) {
    if (type.startsWith(`${media}/`) || (!type && extensions.includes(ext))) return media;
  }
  if (/zip|tar|compressed/.test(type) || ["zip", "tgz", "gz", "rar"].includes(ext)) {
    return "archive";
  }
  if (/csv|sheet|excel/.test(type) || ["csv", "xlsx", "xls"].includes(ext)) return "sheet";
  if (type === "application/pdf" || ext === "pdf") return "pdf";
  return "doc";
}

const TYPE_NAMES: Record<string, string> = {
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

/** A short, human name for a MIME type: "JPEG image" rather than "image/jpeg". */
export function typeName(file: StreamedFile): string {
  const type = (file.file_type ?? "").toLowerCase();
  if (!type) return "";
  if (TYPE_NAMES[type]) return TYPE_NAMES[type];
  const [major, minor = ""] = type.split("/");
  if (["image", "video", "audio"].includes(major) && minor.length <= 8) {
    return `${minor.toUpperCase()} ${major}`;
  }
  return type.length <= 24 ? type : `${extension(file.filename).toUpperCase()} file`;
}

export function capitalize(text: string | null | undefined): string {
  return text ? text.charAt(0).toUpperCase() + text.slice(1) : "";
}

export function stageText(file: StreamedFile): string {
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

export function statusLabel(status: string): string {
  return STATUS_LABELS[status] ?? capitalize(status);
}

export function progressOf(file: StreamedFile): number {
  return Math.max(0, Math.min(100, Number(file.progress) || 0));
}

/** error_message may be huge (a stack trace, a 1 MB log): its start only. */
export function shortError(message: string | null, limit = 400): string {
  const text = message ?? "";
  return text.length > limit ? `${text.slice(0, limit)}…` : text;
}

const relative = new Intl.RelativeTimeFormat("en", { numeric: "auto", style: "short" });
const absolute = new Intl.DateTimeFormat("en", { dateStyle: "medium", timeStyle: "medium" });
const clock = new Intl.DateTimeFormat("en", { timeStyle: "medium" });

export function ago(iso: string, now: number): string {
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return "";
  const seconds = Math.round((then - now) / 1000);
  if (seconds > -10) return "just now";
  if (seconds > -60) return relative.format(seconds, "second");
  if (seconds > -3600) return relative.format(Math.round(seconds / 60), "minute");
  if (seconds > -86400) return relative.format(Math.round(seconds / 3600), "hour");
  return relative.format(Math.round(seconds / 86400), "day");
}

export function dateTime(iso: string): string {
  const then = Date.parse(iso);
  return Number.isNaN(then) ? "" : absolute.format(then);
}

export function timeOfDay(ms: number): string {
  return clock.format(ms);
}

export function newestFirst(a: StreamedFile, b: StreamedFile): number {
  const age = (Date.parse(b.created_at) || 0) - (Date.parse(a.created_at) || 0);
  return age || (a.id < b.id ? 1 : -1);
}
