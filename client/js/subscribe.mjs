// The official @fal-ai/client, unmodified, pointed at ember through proxyUrl (fal-protocol.md §1.2).
//   source var/client.env && node client/js/subscribe.mjs "a black cat with glowing eyes"
// Node ignores a plain-string proxyUrl: the {url, when: "always"} form is required outside browsers.
import { fal } from "@fal-ai/client";

fal.config({
  credentials: process.env.FAL_KEY,
  proxyUrl: { url: process.env.EMBER_PROXY_URL, when: "always" },
});

const prompt = process.argv[2] ?? "a black cat with glowing eyes";
const input = JSON.parse(process.argv[3] ?? "{}");
const updates = [];
const result = await fal.subscribe("fal-ai/lcm", {
  input: { prompt, ...input },
  logs: true,
  onQueueUpdate: (update) => updates.push(update),
});
console.log(JSON.stringify({ result, updates }));
