// Types for streamer-client.js. Field names are exactly those of the wire format
// (SPEC.md, "GET /api/files/events"); a test compares them with the Python models, the
// `files` table and the frames the server builds.

/**
 * A row's processing status: the values the `files` table allows today, and any string,
 * since the table may allow a new one while a page is open. `(string & {})` keeps the
 * known values in an editor's completions, where a plain `string` would swallow them.
 */
export type FileStatus = "pending" | "processing" | "ready" | "failed" | (string & {});

/** The state of a store's connection. */
export type ConnectionStatus = "connecting" | "live" | "reconnecting" | "expired" | "closed";

/**
 * A file's current state, as carried by `file-update`: its row of `files` as Postgres renders
 * it in JSON, without `user_id`, plus `version`. Timestamps are ISO 8601 strings in UTC.
 */
export interface StreamedFile {
  id: string;
  filename: string;
  file_type: string | null;
  status: FileStatus;
  progress: number;
  processing_stage: string | null;
  error_message: string | null;
  created_at: string;
  updated_at: string;
  version: number;
}

/** All that `file-deleted` says about the file: its id. */
export interface DeletedFile {
  id: string;
}

/** `event: file-update`: an INSERT or UPDATE; `file.version` orders updates of one file. */
export interface FileUpdateEvent {
  eventType: "file-update";
  timestamp: string;
  file: StreamedFile;
}

/** `event: file-deleted`: a DELETE, or the file now belongs to someone else. */
export interface FileDeletedEvent {
  eventType: "file-deleted";
  timestamp: string;
  file: DeletedFile;
}

/** `event: heartbeat`: keeps proxies from closing an idle stream; carries no `id:`. */
export interface HeartbeatEvent {
  eventType: "heartbeat";
  timestamp: string;
}

/** `event: synced`: the stream is live; every change committed after it is delivered. */
export interface SyncedEvent {
  eventType: "synced";
  timestamp: string;
}

/** `event: reset`: the cursor could not be honoured; a full snapshot follows. */
export interface ResetEvent {
  eventType: "reset";
  timestamp: string;
}

/** `event: token-expired`: the token reached `exp`; the server closes the stream. */
export interface TokenExpiredEvent {
  eventType: "token-expired";
  timestamp: string;
}

/** Every event, by its SSE event name. */
export interface StreamEventMap {
  "file-update": FileUpdateEvent;
  "file-deleted": FileDeletedEvent;
  heartbeat: HeartbeatEvent;
  synced: SyncedEvent;
  reset: ResetEvent;
  "token-expired": TokenExpiredEvent;
}

export type StreamEvent = StreamEventMap[keyof StreamEventMap];

/** The Svelte store contract: `fn` is called at once, then on every change. */
export interface Readable<T> {
  subscribe(fn: (value: T) => void): () => void;
}

/** A JWT, or nothing to rely on the cookie. Called for every connection the client opens. */
export type GetToken = () => string | null | undefined | Promise<string | null | undefined>;

/** The EventSource constructor, or a stand-in with the same shape (tests, polyfills). */
export interface EventSourceLike {
  readonly readyState: number;
  onerror: ((this: any, event: Event) => any) | null;
  addEventListener(type: string, listener: (event: MessageEvent) => void): void;
  close(): void;
}
export type EventSourceConstructor = new (
  url: string,
  init?: { withCredentials?: boolean },
) => EventSourceLike;

/** Reconnect delays in ms: doubling from `initial` up to `max`, each jittered to 50–100 %. */
export interface Backoff {
  initial?: number;
  max?: number;
}

interface CommonOptions {
  /** Called before each connection the client opens; sent as `access_token`. Absent: cookie. */
  getToken?: GetToken;
  /** Defaults to `globalThis.EventSource`. */
  EventSourceImpl?: EventSourceConstructor;
  /** Send cookies cross-origin (cookie authentication). Default false. */
  withCredentials?: boolean;
  /** Default { initial: 1000, max: 30000 }. */
  backoff?: Backoff;
  /** Failed connections in a row before giving up with status "closed". */
  maxRetries?: number;
}

export interface ConnectFilesOptions extends CommonOptions {
  /** Default "/api/files/events". */
  url?: string;
  /** Ask for every current file before `synced`. Default true. */
  snapshot?: boolean;
}

export interface WatchFileOptions extends CommonOptions {
  /** The file to follow. */
  id: string;
  /** Default (id) => "/api/files/" + id + "/events". */
  url?: string | ((id: string) => string);
}

export interface FilesState {
  /** id → file; a new object on every change, never mutated. */
  files: Record<string, StreamedFile>;
  status: ConnectionStatus;
  /** The last connection problem, as a sentence; null once live again. */
  error: string | null;
  /** The last cursor received. */
  lastEventId: string | null;
  /** Date.now() of the last event received, heartbeats included. */
  lastSeen: number | null;
}

export interface FileState {
  /** null before the first event and after `file-deleted`. */
  file: StreamedFile | null;
  status: ConnectionStatus;
  error: string | null;
  lastEventId: string | null;
  lastSeen: number | null;
}

export declare const DEFAULT_BACKOFF: Readonly<Required<Backoff>>;

/** Every file of the caller, live. Connects on the first subscriber, closes after the last. */
export declare function connectFiles(options?: ConnectFilesOptions): Readable<FilesState>;

/** One file until it is ready, failed or deleted; then status "closed", for good. */
export declare function watchFile(options: WatchFileOptions): Readable<FileState>;
