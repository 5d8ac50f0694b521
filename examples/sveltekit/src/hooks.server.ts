import type { Handle } from "@sveltejs/kit";
import { currentSession } from "$lib/server/session";

export const handle: Handle = async ({ event, resolve }) => {
  event.locals.user = currentSession(event.cookies);
  return resolve(event);
};
