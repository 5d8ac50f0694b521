import type { Session } from "$lib/session";

declare global {
  namespace App {
    interface Locals {
      /** Who the token cookie names, while it has not expired; null when signed out. */
      user: Session | null;
    }
    interface PageData {
      user?: Session | null;
    }
  }
}

export {};
