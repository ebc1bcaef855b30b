// Queue a job from the form and follow it: position, progress with ETA, a preview per step, cancel.

import { fileBase64, follow, request } from "./api.js";
import { input, maskBlob, maskIsEmpty } from "./inpaint.js";
import { readRequest } from "./settings.js";

const jobs = document.getElementById("jobs");
const INPUTS = { img2img: ["image"], inpaint: ["image", "mask"], outpaint: ["image"], upscale: ["image"] };

// The request for `mode` with its images; throws a one-line Error when one is missing.
export async function buildRequest(mode) {
  const body = readRequest(mode);
  const needs = INPUTS[mode] || [];
  if (needs.length && !input()) throw Object.assign(new Error(`${mode} needs an input image`), { field: "image" });
  if (needs.includes("image")) body.image = await fileBase64(input());
  if (needs.includes("mask")) {
    if (maskIsEmpty()) throw Object.assign(new Error("paint the mask first (or Invert for all of it)"), { field: "mask" });
    body.mask = await fileBase64(await maskBlob());
  }
  return body;
}

function seconds(eta) {
  return eta === null || eta === undefined ? "" : `, ${Math.max(0, eta).toFixed(1)} s left`;
}

function card(id, label) {
  const item = document.createElement("li");
  item.className = "job";
  item.dataset.job = id;
  item.innerHTML = `<div class="job-head"><span class="label"></span> <span class="state" aria-live="polite"></span>
    <button type="button" class="cancel">Cancel</button></div>
    <progress max="1" value="0" aria-label="progress"></progress>
    <img class="preview" alt="preview of the current step" hidden>`;
  item.querySelector(".label").textContent = label;
  jobs.prepend(item);
  return item;
}

// Follow job `id` on a new card; each finished image goes to `onImage(job id, image)`.
export function track(id, label, onImage) {
  const item = card(id, label);
  const state = item.querySelector(".state");
  const bar = item.querySelector("progress");
  const preview = item.querySelector(".preview");
  const cancel = item.querySelector(".cancel");
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try { await request("DELETE", `/v1/jobs/${id}`); } catch (e) { state.textContent = e.message; }
  });
  const finish = (data) => {
    item.dataset.state = data.state;
    state.textContent = data.state + (data.error ? `: ${data.error}` : "");
    cancel.hidden = true;
    if (data.state === "done") bar.value = bar.max;
  };
  follow(id, {
    queued: (d) => { item.dataset.state = "queued"; state.textContent = `queued, position ${d.position + 1}`; },
    started: () => { item.dataset.state = "running"; state.textContent = "running"; },
    step: (d) => {
      bar.max = d.total;
      bar.value = d.step;
      state.textContent = `step ${d.step}/${d.total}${seconds(d.eta)}`;
      if (d.preview) { preview.src = d.preview; preview.hidden = false; }
    },
    image: (d) => onImage(id, d),
    done: finish, failed: finish, cancelled: finish,
  });
}
