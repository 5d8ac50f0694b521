// The session is the JWT itself, in the cookie streamer reads (STREAMER_JWT_COOKIE, default
// access_token): a same-origin EventSource sends it with every stream, so the token never
// sits in a URL or in the page's JavaScript.
//
// The app reads the token's claims without verifying its signature: it holds no data of its
// own, and streamer verifies the token on every stream it opens (a forged cookie gets a
// page whose stream is refused, nothing else).
import type { Cookies } from "@sveltejs/kit";
import { env } from "$env/dynamic/private";
import { isExpired, type Session } from "$lib/session";

export function cookieName(): string {
  return env.STREAMER_JWT_COOKIE || "access_token";
}

/** The claims the app shows, or null for something that is not a JWT with a `sub`. */
export function readToken(token: string | null | undefined): Session | null {
  const parts = (token ?? "").split(".");
  if (parts.length !== 3) return null;
  try {
    const claims: unknown = JSON.parse(Buffer.from(parts[1], "base64url").toString());
    if (typeof claims !== "object" || claims === null) return null;
    const { sub, exp } = claims as { sub?: unknown; exp?: unknown };
    if (typeof sub !== "string" || sub === "") return null;
    return { id: sub, expiresAt: typeof exp === "number" ? exp * 1000 : null };
  } catch {
    return null;
  }
}

export function currentSession(cookies: Cookies): Session | null {
  const session = readToken(cookies.get(cookieName()));
  return session && !isExpired(session) ? session : null;
}

/** Keep `token` as the session cookie, or say in a sentence why it cannot be. */
export function signIn(cookies: Cookies, token: string): string | null {
  const session = readToken(token);
  if (!session) return "That is not a JWT with a subject (sub): paste the whole token.";
  if (isExpired(session)) return "That token has expired: mint a new one.";
  const maxAge = session.expiresAt ? Math.floor((session.expiresAt - Date.now()) / 1000) : undefined;
  // httpOnly: no script reads it; the browser sends it to /api/ (same origin) by itself.
  cookies.set(cookieName(), token, { path: "/", httpOnly: true, sameSite: "lax", maxAge });
  return null;
}

export function signOut(cookies: Cookies): void {
  cookies.delete(cookieName(), { path: "/" });
}
