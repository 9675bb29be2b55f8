// The official @fal-ai/client, unmodified, through every verb of fal's protocol against ember.
//   source var/client.env && node --experimental-websocket client/js/protocol.mjs <scenario> [json options]
// Each scenario prints one JSON line; tests/contract/test_js_client.py runs them against the real stack.
//
// Hosts: every request goes through proxyUrl (object form: Node ignores a plain string), except what
// the client sends straight to URLs the server handed out (upload PUTs) and the realtime websocket,
// which is always `wss://fal.run/...`: the WebSocket subclass below sends it to EMBER_REALTIME_URL
// instead (Node 20 needs --experimental-websocket for a global WebSocket; Node >= 22 has one).
import { fal } from "@fal-ai/client";

fal.config({
  credentials: process.env.FAL_KEY,
  proxyUrl: { url: process.env.EMBER_PROXY_URL, when: "always" },
});

if (globalThis.WebSocket && process.env.EMBER_REALTIME_URL) {
  const Base = globalThis.WebSocket;
  globalThis.WebSocket = class extends Base {
    constructor(url, protocols) {
      super(String(url).replace("wss://fal.run/", `${process.env.EMBER_REALTIME_URL}/`), protocols);
    }
  };
}

const [scenario = "stream", rawOptions = "{}"] = process.argv.slice(2);
const options = JSON.parse(rawOptions);
const endpoint = options.endpoint ?? "fal-ai/lcm";
const input = { prompt: "a red fox", image_size: { width: 64, height: 64 }, ...(options.input ?? {}) };
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function apiError(error) {
  return { name: error.constructor.name, status: error.status, body: error.body, message: error.message,
           requestId: error.requestId, isUserTimeout: error.isUserTimeout ?? false };
}

const scenarios = {
  // POST fal.run/{id}/stream: progress events, then the output; done() is the last event.
  async stream() {
    const stream = await fal.stream(endpoint, { input });
    const events = [];
    for await (const event of stream) events.push(event);
    return { events, final: await stream.done() };
  },

  // subscribe in mode "streaming": the queue status as server-sent events (status/stream).
  async streaming() {
    const updates = [];
    const result = await fal.subscribe(endpoint, { input, logs: true, mode: "streaming",
                                                  onQueueUpdate: (u) => updates.push(u) });
    return { result, updates };
  },

  // queue.submit with every option, then status (logs) and result.
  async submit() {
    const { request_id: requestId } = await fal.queue.submit(endpoint, {
      input, webhookUrl: options.webhookUrl, priority: options.priority ?? "low", hint: "cpu-pool",
      startTimeout: 30,
    });
    let status;
    for (let i = 0; i < 600; i++) {
      status = await fal.queue.status(endpoint, { requestId, logs: true });
      if (status.status === "COMPLETED") break;
      await sleep(100);
    }
    const result = await fal.queue.result(endpoint, { requestId });
    return { requestId, status, result };
  },

  // Cancel a running request, then read its status and result.
  async cancel() {
    const { request_id: requestId } = await fal.queue.submit(endpoint, { input });
    let status;
    for (let i = 0; i < 600; i++) {
      status = await fal.queue.status(endpoint, { requestId, logs: true });
      if (status.status === "IN_PROGRESS" && (status.logs ?? []).some((l) => l.message.startsWith("step"))) break;
      await sleep(20);
    }
    const cancelled = await fal.queue.cancel(endpoint, { requestId });
    for (let i = 0; i < 600; i++) {
      status = await fal.queue.status(endpoint, { requestId, logs: true });
      if (status.status === "COMPLETED") break;
      await sleep(50);
    }
    let error;
    try {
      await fal.queue.result(endpoint, { requestId });
    } catch (e) {
      error = apiError(e);
    }
    let again;
    try {
      await fal.queue.cancel(endpoint, { requestId });
    } catch (e) {
      again = apiError(e);
    }
    return { requestId, cancelled: cancelled ?? null, status, error, again };
  },

  // storage.upload: initiate through the proxy, then the PUT straight to the signed upload_url.
  async upload() {
    const size = options.size ?? 1000;
    const bytes = new Uint8Array(size);
    for (let i = 0; i < size; i++) bytes[i] = i % 251;
    const url = await fal.storage.upload(new Blob([bytes], { type: options.type ?? "application/octet-stream" }),
                                         options.lifecycle ? { lifecycle: options.lifecycle } : undefined);
    const response = await fetch(url);
    const back = new Uint8Array(await response.arrayBuffer());
    let same = back.length === size;
    for (let i = 0; same && i < size; i += 9973) same = back[i] === bytes[i];
    return { url, status: response.status, size: back.length, same };
  },

  // A submit whose start timeout passes while the queue is busy: ApiError 504, isUserTimeout.
  async "start-timeout"() {
    try {
      await fal.subscribe(endpoint, { input, startTimeout: options.startTimeout ?? 2, pollInterval: 100 });
      return { error: null };
    } catch (e) {
      return { error: apiError(e) };
    }
  },

  // realtime.connect: token through the proxy (rest.fal.ai/tokens/), websocket through the shim.
  async realtime() {
    const results = [];
    const errors = [];
    const connection = fal.realtime.connect(endpoint, {
      tokenProvider: options.useDefaultToken ? undefined : async (app) => {
        const response = await fetch(process.env.EMBER_PROXY_URL, {
          method: "POST",
          headers: { "content-type": "application/json", authorization: `Key ${process.env.FAL_KEY}`,
                     "x-fal-target-url": "https://rest.fal.ai/tokens/" },
          body: JSON.stringify({ allowed_apps: [app.split("/")[1]], token_expiration: 120 }),
        });
        return await response.json();
      },
      tokenExpirationSeconds: 120,
      throttleInterval: 0,
      onResult: (result) => results.push(result),
      onError: (error) => errors.push(apiError(error)),
    });
    connection.send({ ...input, request_id: "js-1", seed: 11 });
    for (let i = 0; i < 300 && results.length < 1; i++) await sleep(50);
    connection.send({ ...input, num_inference_steps: 99, request_id: "js-bad" });
    for (let i = 0; i < 300 && errors.length < 1; i++) await sleep(50);
    connection.send({ ...input, request_id: "js-2", seed: 12 });
    for (let i = 0; i < 300 && results.length < 2; i++) await sleep(50);
    connection.close();
    return { results, errors };
  },
};

const run = scenarios[scenario];
if (!run) throw new Error(`unknown scenario ${scenario}`);
const out = await run();
console.log(JSON.stringify(out));
process.exit(0);
