// The page: pick or drop an image, get its caption, then talk about it: each question is sent with the
// conversation so far (the caption and the earlier answers), one conversation per image. Talks to
// /v1/caption and /v1/chat/completions.
"use strict";

const $ = (id) => document.getElementById(id);
let image = null; // the File being described
let conversation = []; // the messages so far about this image, which each question continues

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function chat(messages) {
  const started = performance.now();
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: $("model").value, messages, max_tokens: 40 }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error((body.error && body.error.message) || `${response.status} ${response.statusText}`);
  }
  return { answer: body.choices[0].message.content, model: body.model, ms: performance.now() - started };
}

async function call(path, form) {
  const started = performance.now();
  const response = await fetch(path, { method: "POST", body: form });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error((body.error && body.error.message) || `${response.status} ${response.statusText}`);
  }
  body.roundTripMs = performance.now() - started;
  return body;
}

function request(extra) {
  const form = new FormData();
  form.append("image", image, image.name || "image");
  form.append("model", $("model").value);
  for (const [k, v] of Object.entries(extra)) form.append(k, v);
  return form;
}

function timing(body) {
  return `${Math.round(body.roundTripMs)} ms (server ${Math.round(body.seconds * 1000)} ms, ${body.model})`;
}

function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; }

async function describe(file) {
  image = file;
  showError(null);
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("hint").hidden = true;
  $("caption").textContent = "…";
  $("caption").dataset.state = "busy";
  $("caption-time").textContent = "";
  $("answers").replaceChildren();
  conversation = [];
  try {
    const body = await call("/v1/caption", request({}));
    $("caption").textContent = body.caption;
    $("caption-time").textContent = timing(body);
    // The image with an empty question, then its caption: how a conversation about an image starts.
    const url = await dataUrl(file);
    conversation = [
      { role: "user", content: [{ type: "image_url", image_url: { url } }] },
      { role: "assistant", content: body.caption },
    ];
    $("question").disabled = $("ask").disabled = false;
  } catch (err) {
    $("caption").textContent = "";
    showError(err);
  } finally {
    $("caption").dataset.state = "done";
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!image || !question) return;
  showError(null);
  const item = document.createElement("li");
  item.innerHTML = '<span class="q"></span><br><strong class="a">…</strong> <span class="time"></span>';
  item.querySelector(".q").textContent = question;
  $("answers").append(item);
  $("question").value = "";
  const messages = [...conversation, { role: "user", content: question }];
  try {
    const reply = await chat(messages);
    item.querySelector(".a").textContent = reply.answer;
    item.querySelector(".time").textContent = `${Math.round(reply.ms)} ms (${reply.model})`;
    conversation = [...messages, { role: "assistant", content: reply.answer }];
  } catch (err) {
    item.remove();
    showError(err);
  }
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    const list = await response.json();
    for (const m of list.data) {
      const option = new Option(m.parent ? `${m.id} (adapter)` : `${m.id} (base)`, m.id);
      $("model").append(option);
    }
    // The first adapter is what the API uses by default; the base comes first in the list.
    const adapter = list.data.find((m) => m.parent);
    if (adapter) $("model").value = adapter.id;
  } catch (err) {
    showError(err);
  }
}

function setUp() {
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) describe(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", () => { if ($("file").files.length) describe($("file").files[0]); });
  $("ask-form").addEventListener("submit", ask);
  $("model").addEventListener("change", () => { if (image) describe(image); });
  loadModels();
}

setUp();
