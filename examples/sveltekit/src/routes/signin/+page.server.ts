import { fail, redirect } from "@sveltejs/kit";
import { env } from "$env/dynamic/private";
import { signIn } from "$lib/server/session";
import type { Actions, PageServerLoad } from "./$types";

// A link that carries a token (`/signin?token=…`) signs in whoever opens it: handy in
// development (`make example` prints one), a login-CSRF hole in production. Off unless
// DEV_SIGNIN_LINKS=1.
const linksAllowed = () => env.DEV_SIGNIN_LINKS === "1";

export const load: PageServerLoad = ({ url, cookies }) => {
  const token = url.searchParams.get("token");
  if (token === null) return { error: null };
  if (!linksAllowed()) {
    return { error: "Sign-in links are turned off here (DEV_SIGNIN_LINKS): paste the token." };
  }
  const error = signIn(cookies, token.trim());
  if (error) return { error };
  redirect(303, "/files");
};

export const actions: Actions = {
  default: async ({ request, cookies }) => {
    const form = await request.formData();
    const error = signIn(cookies, String(form.get("token") ?? "").trim());
    if (error) return fail(400, { error });
    redirect(303, "/files");
  },
};
