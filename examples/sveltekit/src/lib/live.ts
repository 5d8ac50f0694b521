// The page's streams, through streamer-client. Same origin (nginx sends /api/ to streamer),
// so no getToken: the browser sends the session cookie with each stream by itself. A page
// whose token comes from elsewhere (supabase.auth.getSession()) passes getToken instead.
import { browser } from "$app/environment";
import { readable, type Readable } from "svelte/store";
import {
  connectFeed,
  connectFiles,
  watchFile,
  type FeedState,
  type FilesState,
  type FileState,
  type RowFilter,
} from "streamer-client";
import type { Filter } from "./format";

const idle = {
  status: "connecting",
  error: null,
  errorCode: null,
  lastEventId: null,
  lastSeen: null,
} as const;

/** Every file of the signed-in user, live. On the server: empty and "connecting". */
export function liveFiles(): Readable<FilesState> {
  return browser ? connectFiles() : readable({ files: {}, ...idle });
}

/** What each tab but "All" asks the server for: PostgREST filters on the files' columns. */
export const TAB_FILTERS: Record<Exclude<Filter, "all">, RowFilter> = {
  active: { status: "in.(pending,processing)" },
  ready: { status: "eq.ready" },
  failed: { status: "eq.failed" },
};

/**
 * The files of one tab, live, from a stream the server filters: a file that stops matching
 * (a processing file now ready) leaves as a delete, one that starts matching arrives. The
 * stream opens with the store's first subscriber and closes with its last.
 */
export function liveTab(tab: Exclude<Filter, "all">): Readable<FeedState> {
  return browser ? connectFeed({ filter: TAB_FILTERS[tab] }) : readable({ rows: {}, ...idle });
}

/**
 * One file until it is ready, failed or deleted. A file that does not exist (or is someone
 * else's) is refused like a bad token, which EventSource cannot tell apart: give up soon.
 */
export function liveFile(id: string): Readable<FileState> {
  return browser ? watchFile({ id, maxRetries: 3 }) : readable({ file: null, ...idle });
}
