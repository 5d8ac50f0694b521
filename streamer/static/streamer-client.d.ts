// Types for streamer-client.js. Field names are exactly those of the wire format
// (docs/API.md, "Events"); a test compares them with the Python models, the
// `files` table and the frames the server builds. Any other feed (docs/DATABASE.md, "Any table is a
// feed") has the same events with its own row type: the generic types below, whose `Row`
// defaults to the files feed's.

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

/**
 * A row's primary key as JSON carries it: a uuid or text is a string, a bigint a number
 * (past 2^53 a JavaScript number rounds it, as JSON.parse does everywhere).
 */
export type RowId = string | number;

/** What every feed's row carries: its id, and `version` to order its updates. */
export interface FeedRow {
  id: RowId;
  version: number;
}

/** `event: <event>-update` of any feed, its row under the data key `<event>`. */
export type RowUpdateEvent<Row extends FeedRow = StreamedFile, Event extends string = "file"> = {
  eventType: `${Event}-update`;
  timestamp: string;
} & { [K in Event]: Row };

/** `event: <event>-deleted` of any feed: the row's id under the data key `<event>`. */
export type RowDeletedEvent<Row extends FeedRow = StreamedFile, Event extends string = "file"> = {
  eventType: `${Event}-deleted`;
  timestamp: string;
} & { [K in Event]: { id: Row["id"] } };

/** Every event of a feed, by its SSE event name; for files, the same as StreamEventMap. */
export type FeedEventMap<Row extends FeedRow = StreamedFile, Event extends string = "file"> = {
  [K in `${Event}-update`]: RowUpdateEvent<Row, Event>;
} & { [K in `${Event}-deleted`]: RowDeletedEvent<Row, Event> } & {
  heartbeat: HeartbeatEvent;
  synced: SyncedEvent;
  reset: ResetEvent;
  "token-expired": TokenExpiredEvent;
};

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

/** The fetch function, or a stand-in: only its status and JSON body are read. */
export type FetchLike = (
  url: string,
  init: { credentials: "include" | "same-origin"; cache: "no-store"; signal?: AbortSignal },
) => Promise<{ ok: boolean; status: number; json(): Promise<unknown> }>;

interface CommonOptions {
  /** Called before each connection the client opens; sent as `access_token`. Absent: cookie. */
  getToken?: GetToken;
  /** Defaults to `globalThis.EventSource`. */
  EventSourceImpl?: EventSourceConstructor;
  /**
   * Asks a stream refused before it opened why (an EventSource cannot see the status).
   * Defaults to `globalThis.fetch`; without one every refusal is retried alike.
   */
  fetchImpl?: FetchLike;
  /** Send cookies cross-origin (cookie authentication). Default false. */
  withCredentials?: boolean;
  /** Default { initial: 1000, max: 30000 }. */
  backoff?: Backoff;
  /** Failed connections in a row before giving up with status "closed". */
  maxRetries?: number;
}

/** Which feed to follow (docs/DATABASE.md, "Any table is a feed"). */
export interface FeedOptions extends CommonOptions {
  /** The feed's name (its table): `/api/<feed>/events`. Default "files". */
  feed?: string;
  /**
   * The feed's event name, exactly as given to `streamer.enable_feed(..., event => …)`:
   * the client listens to `<event>-update` and `<event>-deleted` and reads the row under
   * the data key `<event>`. Default "file" for the files feed, else the feed's name.
   */
  event?: string;
}

/** A comparison operator of a filter, PostgREST's, each negatable with `not.`. */
export type FilterOperator =
  | "eq"
  | "neq"
  | "lt"
  | "lte"
  | "gt"
  | "gte"
  | "in"
  | "is"
  | "like"
  | "ilike";

/**
 * One PostgREST filter expression: `eq.ready`, `gte.50`, `in.(pending,processing)`,
 * `is.null`, `ilike.*.pdf` (`*` is the wildcard), `not.eq.failed`. The value is written as
 * the server reads it; the client only encodes it into the URL.
 */
export type FilterExpression = `${"" | "not."}${FilterOperator}.${string}`;

/** Query parameters of the stream itself, which no filter may name as a column. */
export type ReservedParameter = "snapshot" | "last_event_id" | "access_token" | "select";

/**
 * Filters on the row's columns, ANDed: one expression, or several for one column
 * (`{ progress: ["gte.10", "lt.50"] }`). A column whose value is undefined is left out.
 */
export type RowFilter<Row extends FeedRow = StreamedFile> = {
  [Column in Exclude<keyof Row & string, ReservedParameter>]?:
    | FilterExpression
    | readonly FilterExpression[];
};

/** What a stream sends of a row under `select`: those columns, and always id and version. */
export type Selected<Row extends FeedRow, Column extends keyof Row> = Pick<
  Row,
  Column | "id" | "version"
>;

export interface ConnectFeedOptions<
  Row extends FeedRow = StreamedFile,
  Column extends keyof Row & string = keyof Row & string,
> extends FeedOptions {
  /** Default "/api/<feed>/events". */
  url?: string;
  /** Ask for every current row before `synced`. Default true. */
  snapshot?: boolean;
  /** Only the rows that match, as long as they match: one that stops matching is deleted. */
  filter?: RowFilter<Row>;
  /** Only these columns (id and version always come); the rows' type narrows to them. */
  select?: readonly Column[];
}

export interface WatchRowOptions<Row extends FeedRow = StreamedFile> extends FeedOptions {
  /** The row to follow: a string for uuid and text ids, a number (or its string) for bigints. */
  id: RowId;
  /** Default (id) => "/api/<feed>/" + id + "/events". */
  url?: string | ((id: RowId) => string);
  /**
   * Whether an update is the row's last: the store then closes for good. Mirror the feed's
   * `enable_feed(..., terminal => …)`, after which the server ends the stream. Default for
   * files: status "ready" or "failed"; for other feeds none: only a delete ends the watch,
   * and the browser reconnects each time the server ends the stream at a terminal row.
   */
  terminal?: (row: Row) => boolean;
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

export interface FeedState<Row extends FeedRow = StreamedFile> {
  /**
   * id → row; a new object on every change, never mutated. A numeric id is a key as its
   * decimal string (`rows[7]` and `rows["7"]` are the same row), and such keys come first
   * in ascending order, as for any JavaScript object.
   */
  rows: Record<string, Row>;
  status: ConnectionStatus;
  /** The last connection problem, as a sentence; null once live again. */
  error: string | null;
  /** The server's code for it, when it said (`INVALID_FILTER`, `FORBIDDEN`, ...). */
  errorCode: string | null;
  /** The last cursor received. */
  lastEventId: string | null;
  /** Date.now() of the last event received, heartbeats included. */
  lastSeen: number | null;
}

export interface RowState<Row extends FeedRow = StreamedFile> {
  /** null before the first event and after `<event>-deleted`. */
  row: Row | null;
  status: ConnectionStatus;
  error: string | null;
  errorCode: string | null;
  lastEventId: string | null;
  lastSeen: number | null;
}

/** A store of any feed, generic over its row type; the files feed's by default. */
export type FeedStore<Row extends FeedRow = StreamedFile> = Readable<FeedState<Row>>;
export type RowStore<Row extends FeedRow = StreamedFile> = Readable<RowState<Row>>;

export interface FilesState {
  /** id → file; a new object on every change, never mutated. */
  files: Record<string, StreamedFile>;
  status: ConnectionStatus;
  /** The last connection problem, as a sentence; null once live again. */
  error: string | null;
  /** The server's code for it, when it said (`INVALID_FILTER`, `FORBIDDEN`, ...). */
  errorCode: string | null;
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
  errorCode: string | null;
  lastEventId: string | null;
  lastSeen: number | null;
}

export declare const DEFAULT_BACKOFF: Readonly<Required<Backoff>>;

/**
 * Every row of the caller in one feed, live: `connectFeed<Job>({ feed: "jobs", event: "job" })`.
 * Connects on the first subscriber, closes after the last. With `select` the rows' type is
 * narrowed to those columns: inferred for files (`connectFeed({ select: ["status"] })`);
 * for another row type name them too (`connectFeed<Job, "status">({ ..., select: ["status"] })`).
 * A refusal retrying cannot cure (400 `INVALID_FILTER`, 403 `FORBIDDEN`) closes the store
 * for good, with the server's sentence in `error` and its code in `errorCode`.
 */
export declare function connectFeed<
  Row extends FeedRow = StreamedFile,
  Column extends keyof Row & string = keyof Row & string,
>(options?: ConnectFeedOptions<Row, Column>): FeedStore<Selected<Row, Column>>;

/**
 * One row of a feed until `terminal(row)` or its deletion; then status "closed", for good.
 * So too after a 400 `INVALID_ID` or a 403 `FORBIDDEN`, with the server's sentence in `error`.
 */
export declare function watchRow<Row extends FeedRow = StreamedFile>(
  options: WatchRowOptions<Row>,
): RowStore<Row>;

/** Every file of the caller, live. Connects on the first subscriber, closes after the last. */
export declare function connectFiles(options?: ConnectFilesOptions): Readable<FilesState>;

/** One file until it is ready, failed or deleted; then status "closed", for good. */
export declare function watchFile(options: WatchFileOptions): Readable<FileState>;
