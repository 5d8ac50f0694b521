/** The signed-in user, as the token cookie names them. */
export interface Session {
  /** The token's `sub`: the user whose rows the streams carry. */
  id: string;
  /** The token's `exp` in ms since the epoch, or null if it has none. */
  expiresAt: number | null;
}

export function isExpired(session: Session, now = Date.now()): boolean {
  return session.expiresAt !== null && session.expiresAt <= now;
}
