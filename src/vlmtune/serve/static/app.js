// The page: pick or drop an image, get its caption, ask questions. Talks to /v1/caption and /v1/ask.
"use strict";

const $ = (id) => document.getElementById(id);
let image = null; // the File being described

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
  try {
    const body = await call("/v1/caption", request({}));
    $("caption").textContent = body.caption;
    $("caption-time").textContent = timing(body);
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
  $("answers").prepend(item);
  try {
    const body = await call("/v1/ask", request({ question }));
    item.querySelector(".a").textContent = body.answer;
    item.querySelector(".time").textContent = timing(body);
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
