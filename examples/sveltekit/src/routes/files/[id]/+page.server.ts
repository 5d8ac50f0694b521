import { error, redirect } from "@sveltejs/kit";
import type { PageServerLoad } from "./$types";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export const load: PageServerLoad = ({ locals, params }) => {
  if (!locals.user) redirect(303, "/signin");
  // streamer would answer 400 INVALID_ID, which an EventSource cannot show: say it here.
  if (!UUID.test(params.id)) error(404, "There is no such file.");
  return { id: params.id.toLowerCase() };
};
