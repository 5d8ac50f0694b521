import { sveltekit } from "@sveltejs/kit/vite";
import { defineConfig } from "vite";

// `npm run dev` without nginx: /api/ goes to one streamer (STREAMER_URL, default :8080).
// In production nginx sends /api/ to the streamer nodes and the rest to `node build`.
export default defineConfig({
  plugins: [sveltekit()],
  server: {
    proxy: { "/api": process.env.STREAMER_URL ?? "http://127.0.0.1:8080" },
  },
});
