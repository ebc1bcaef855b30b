// The settings form: filled from the API, read into GenerationParams, kept in localStorage.

import { get, post } from "./api.js";

const STORE = "openldm.settings";
const form = document.getElementById("form");
const NUMBERS = ["steps", "cfg", "width", "height", "seed", "batch_size", "batch_count", "strength",
  "mask_blur", "only_masked_padding", "upscale_by", "hires_steps", "hires_strength"];
const INTEGERS = new Set(["steps", "width", "height", "seed", "batch_size", "batch_count",
  "only_masked_padding", "hires_steps"]);
const SIDES = ["left", "right", "top", "bottom"];
export let samplers = [];

function field(name) { return form.elements.namedItem(name); }

function number(name) {
  const text = field(name).value.trim();
  if (text === "") return null;
  const value = Number(text);
  return INTEGERS.has(name) && Number.isInteger(value) ? value : Number.isNaN(value) ? text : value;
}

// The job request the form describes for `mode` (image and mask are added by the caller).
export function readRequest(mode) {
  const params = { prompt: field("prompt").value, negative: field("negative").value,
    sampler: field("sampler").value, schedule: field("schedule").value || null };
  const used = ["steps", "cfg", "seed", "batch_size", "batch_count"];
  if (mode === "txt2img") used.push("width", "height");
  if (mode === "img2img" || mode === "inpaint") {
    used.push("strength");
    params.resize_mode = field("resize_mode").value;
  }
  if (mode === "inpaint") {
    used.push("mask_blur", "only_masked_padding");
    params.masked_content = field("masked_content").value;
    params.only_masked = field("only_masked").checked;
  }
  if (mode === "outpaint") params.outpaint = SIDES.map((s) => number(`outpaint_${s}`) ?? 0);
  const hires = mode === "txt2img" && field("hires").checked;
  if (hires || mode === "upscale") {
    used.push("upscale_by", "hires_steps", "hires_strength");
    params.upscaler = field("upscaler").value;
  }
  for (const name of used) {
    const value = number(name);
    if (value !== null) params[name] = value;
  }
  return { mode, params, model: field("model").value || null, hires };
}

// Put a job's settings (GenerationParams JSON) back into the form.
export function fillForm(params) {
  for (const [name, value] of Object.entries(params)) {
    const el = field(name);
    if (!el || value === undefined || el instanceof RadioNodeList) continue;
    if (el.type === "checkbox") el.checked = Boolean(value);
    else if (name === "sampler") el.value = samplerName(value);
    else el.value = value === null ? "" : value;
  }
  if (params.outpaint) SIDES.forEach((s, i) => { field(`outpaint_${s}`).value = params.outpaint[i]; });
  save();
  countTokens();
}

function samplerName(value) {
  const key = String(value).toLowerCase();
  const found = samplers.find((s) => [s.name, s.display, ...s.aliases].some((n) => n.toLowerCase() === key));
  return found ? found.name : value;
}

function options(select, items, keep) {
  select.replaceChildren(...keep, ...items.map(([value, text]) => new Option(text, value)));
}

// Model, sampler and scheduler pickers and the size presets, from the API.
export async function loadPickers() {
  const [models, samplerList, schedules] = await Promise.all(
    [get("/v1/models"), get("/v1/samplers"), get("/v1/schedulers")]);
  samplers = samplerList;
  options(field("model"), models.models.map((m) => [m.name, `${m.name} [${m.hash}]`]), []);
  field("model").value = models.default;
  options(field("sampler"), samplers.map((s) => [s.name, s.display]), []);
  const schedule = field("schedule");
  options(schedule, schedules.map((s) => [s.name, s.display]), [schedule.options[0]]);
  field("model").addEventListener("change", () => sizePresets(models));
  sizePresets(models);
}

function sizePresets(models) {
  const model = models.models.find((m) => m.name === field("model").value);
  const side = model && model.size ? model.size : 512;
  const eight = (v) => Math.max(8, Math.round(v / 8) * 8);
  const sizes = [[side, side], [eight(side * 3 / 4), side], [side, eight(side * 3 / 4)]];
  const box = document.getElementById("size-presets");
  box.replaceChildren(...sizes.map(([w, h]) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `${w}×${h}`;
    button.setAttribute("aria-label", `size ${w} by ${h}`);
    button.addEventListener("click", () => { field("width").value = w; field("height").value = h; save(); });
    return button;
  }));
  if (!field("width").value) { field("width").value = side; field("height").value = side; }
}

export function save() {
  const values = {};
  for (const el of form.elements) {
    if (!el.name || el.type === "file") continue;
    values[el.name] = el.type === "checkbox" ? el.checked : el.value;
  }
  localStorage.setItem(STORE, JSON.stringify(values));
}

export function restore() {
  const values = JSON.parse(localStorage.getItem(STORE) || "{}");
  for (const [name, value] of Object.entries(values)) {
    const el = field(name);
    if (!el || el instanceof RadioNodeList) continue;
    if (el.type === "checkbox") el.checked = value;
    else if (el.tagName !== "SELECT" || [...el.options].some((o) => o.value === value)) el.value = value;
  }
}

let pending = 0;
// Tokens per 75-token chunk of both prompts, by the server's tokenizer for the chosen model.
export function countTokens() {
  clearTimeout(pending);
  pending = setTimeout(async () => {
    for (const name of ["prompt", "negative"]) {
      const out = document.getElementById(`${name}-tokens`);
      try {
        const counts = await post("/v1/tokens", { prompt: field(name).value, model: field("model").value || null });
        out.textContent = counts.chunks.map((n) => `${n}/${counts.chunk_size}`).join(" · ");
      } catch (e) {
        out.textContent = "";
      }
    }
  }, 250);
}
