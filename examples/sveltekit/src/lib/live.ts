// The page's streams, through streamer-client. Same origin (nginx sends /api/ to streamer),
// so no getToken: the browser sends the session cookie with each stream by itself. A page
// whose token comes from elsewhere (supabase.auth.getSession()) passes getToken instead.
import { browser } from "$app/environment";
import { readable, type Readable } from "svelte/store";
import { connectFiles, watchFile, type FilesState, type FileState } from "streamer-client";

const idle = { status: "connecting", error: null, lastEventId: null, lastSeen: null } as const;

/** Every file of the signed-in user, live. On the server: empty and "connecting". */
export function liveFiles(): Readable<FilesState> {
  return browser ? connectFiles() : readable({ files: {}, ...idle });
}

/**
 * One file until it is ready, failed or deleted. A file that does not exist (or is someone
 * else's) is refused like a bad token, which EventSource cannot tell apart: give up soon.
 */
export function liveFile(id: string): Readable<FileState> {
  return browser ? watchFile({ id, maxRetries: 3 }) : readable({ file: null, ...idle });
}
