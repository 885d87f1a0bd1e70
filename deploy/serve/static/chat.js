// The chat page: a client of the server's own OpenAI-compatible API (/v1/models and a streamed
// /v1/chat/completions with "denoise": true), drawing the canvas after every denoising step.
"use strict";

const MASK = "\u2591"; // the server's mask symbol
const $ = (id) => document.getElementById(id);
const history = [];
let model = null;

function headers() {
  const key = $("api-key").value || localStorage.getItem("dgpt-api-key") || "";
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("key-label").hidden = false;
    $("status").textContent = "this server needs an API key";
    return;
  }
  model = (await response.json()).data[0];
  $("model").textContent = model.id;
  const defaults = model.sampler_defaults;
  $("strategy").replaceChildren(...model.strategies.map((s) => new Option(s, s, false, s === defaults.strategy)));
  $("steps").value = defaults.steps;
  $("max-tokens").value = model.canvas;
  $("max-tokens").max = model.max_tokens_cap;
  $("status").textContent = "";
}

// The text with each run of masks in a span, so masks and resolved tokens look different.
function drawCanvas(element, text) {
  const parts = text.split(new RegExp(`(${MASK}+)`)).filter((p) => p);
  element.replaceChildren(...parts.map((part) => {
    if (!part.startsWith(MASK)) return document.createTextNode(part);
    const span = document.createElement("span");
    span.className = "mask";
    span.textContent = part;
    return span;
  }));
}

function addTurn(role, text) {
  const turn = document.createElement("div");
  turn.className = "turn " + role;
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  turn.append(body);
  $("conversation").append(turn);
  turn.scrollIntoView({ block: "end" });
  return turn;
}

// Server-sent events of a fetch response, parsed: yields each `data:` JSON object.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addTurn("user", text);
  const turn = addTurn("assistant", "");
  const body = turn.querySelector(".body");
  const meta = document.createElement("span");
  meta.className = "meta";
  turn.append(meta);
  document.body.dataset.busy = "true";
  $("send").disabled = true;
  const start = performance.now();
  let answer = "";
  let nfe = 0;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: model ? model.id : "model", messages: history, stream: true, denoise: true,
        max_tokens: Number($("max-tokens").value) || undefined,
        sampler: { strategy: $("strategy").value, steps: Number($("steps").value) || undefined },
      }),
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.denoise) {
        drawCanvas(body, chunk.denoise.canvas[0]);
        nfe = chunk.denoise.nfe;
        meta.textContent = `step ${chunk.denoise.step} · nfe ${nfe} · ${((performance.now() - start) / 1000).toFixed(2)} s`;
      }
      for (const choice of chunk.choices || []) answer += (choice.delta && choice.delta.content) || "";
      if (chunk.nfe !== undefined) nfe = chunk.nfe;
    }
    drawCanvas(body, answer);
    meta.textContent = `${nfe} forward passes · ${((performance.now() - start) / 1000).toFixed(2)} s`;
    history.push({ role: "assistant", content: answer });
    turn.dataset.done = "true";
  } catch (err) {
    history.pop();
    turn.classList.add("error");
    body.textContent = "error: " + err.message;
    turn.dataset.done = "error";
  } finally {
    document.body.dataset.busy = "false";
    $("send").disabled = false;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || document.body.dataset.busy === "true") return;
  $("message").value = "";
  send(text);
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("reset").addEventListener("click", () => {
  history.length = 0;
  $("conversation").replaceChildren();
});
$("api-key").addEventListener("change", () => {
  localStorage.setItem("dgpt-api-key", $("api-key").value);
  loadModel();
});
loadModel();
