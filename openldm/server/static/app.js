// The page: modes, the Generate action and its errors, PNG drops, keys; each view lives in its own module.

import { fileBase64, post } from "./api.js";
import { addImage, loadHistory, setupViewer } from "./gallery.js";
import { buildRequest, track } from "./generate.js";
import { setInput, setupMask } from "./inpaint.js";
import { countTokens, fillForm, loadPickers, restore, save } from "./settings.js";

const form = document.getElementById("form");
const error = document.getElementById("error");
const MODE_KEY = "openldm.mode";
let mode = localStorage.getItem(MODE_KEY) || "txt2img";
let lastSeed = null;

function setMode(next) {
  mode = next;
  localStorage.setItem(MODE_KEY, mode);
  for (const tab of document.querySelectorAll("#modes [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
    tab.tabIndex = tab.dataset.mode === mode ? 0 : -1;
  }
  for (const el of document.querySelectorAll("[data-modes]")) {
    el.hidden = !el.dataset.modes.split(" ").includes(mode);
  }
}

function showError(message, field) {
  error.textContent = message;
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  const el = field && form.elements.namedItem(field);
  if (el && el.setAttribute) { el.setAttribute("aria-invalid", "true"); el.focus(); }
}

function onImage(jobId, image) {
  lastSeed = image.seed;
  addImage(jobId, image);
}

async function generate() {
  showError("");
  try {
    const body = await buildRequest(mode);
    const queued = await post("/v1/jobs", body);
    track(queued.id, `${mode}: ${body.params.prompt.slice(0, 60)}`, onImage);
  } catch (e) {
    showError(e.message.split("\n")[0], e.field);
  }
}

async function readPng(file) {
  showError("");
  try {
    const info = await post("/v1/png-info", { image: await fileBase64(file) });
    if (!info.params) throw new Error("this PNG holds no generation settings");
    fillForm(info.params);
    if (info.mode) setMode(info.mode);
  } catch (e) {
    showError(e.message.split("\n")[0], e.field);
  }
}

function setupKeys() {
  const tabs = [...document.querySelectorAll("#modes [role=tab]")];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => setMode(tab.dataset.mode));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      setMode(next.dataset.mode);
      next.focus();
    });
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
  });
}

function setupInputs() {
  form.addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  form.addEventListener("change", save);
  for (const name of ["prompt", "negative"]) form.elements.namedItem(name).addEventListener("input", countTokens);
  form.elements.namedItem("model").addEventListener("change", countTokens);
  document.getElementById("seed-random").addEventListener("click", () => { form.elements.seed.value = -1; save(); });
  document.getElementById("seed-last").addEventListener("click", () => {
    if (lastSeed === null) showError("no image yet: nothing to reuse the seed of");
    else { form.elements.seed.value = lastSeed; save(); }
  });
  document.getElementById("image-file").addEventListener("change", (e) => {
    if (e.target.files[0]) setInput(e.target.files[0]).catch((err) => showError(err.message));
  });
  document.getElementById("png-file").addEventListener("change", (e) => {
    if (e.target.files[0]) readPng(e.target.files[0]);
  });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) readPng(file);
  });
}

async function main() {
  setMode(mode);
  setupKeys();
  setupInputs();
  setupMask();
  setupViewer({
    reuse: (params, jobMode) => { fillForm(params); setMode(jobMode); },
    send: (blob, target) => { setMode(target); setInput(blob).catch((e) => showError(e.message)); },
  });
  try {
    await loadPickers();
    restore();
    countTokens();
    const jobs = await loadHistory();
    for (const job of jobs.filter((j) => j.state === "queued" || j.state === "running").reverse()) {
      track(job.id, `${job.mode}: ${job.params.prompt.slice(0, 60)}`, onImage);
    }
    const seeded = jobs.find((j) => j.images.length);
    if (seeded) lastSeed = seeded.images[0].seed;
  } catch (e) {
    showError(e.message);
  }
  document.body.dataset.ready = "true";
}

main();
