// Finished images, newest first, from this page and the job store; the viewer shows one with its infotext.

import { fileBase64, get, imageBlob, post } from "./api.js";

const gallery = document.getElementById("gallery");
const viewer = document.getElementById("viewer");
const status = document.getElementById("viewer-status");
let current = null; // {job, image} shown in the viewer

export function addImage(jobId, image, atEnd = false) {
  if (gallery.querySelector(`[data-name="${image.name}"]`)) return;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "thumb";
  button.dataset.name = image.name;
  button.dataset.job = jobId;
  button.dataset.seed = image.seed;
  button.setAttribute("aria-label", `image ${image.name}, seed ${image.seed}`);
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = `seed ${image.seed}`;
  button.append(img);
  button.addEventListener("click", () => open(jobId, image));
  if (atEnd) gallery.append(button); else gallery.prepend(button);
}

// Past jobs' images from the store, so a reload or a server restart loses nothing.
export async function loadHistory() {
  const page = await get("/v1/jobs?limit=100");
  for (const job of page.jobs) {
    for (const image of job.images) addImage(job.id, image, true);
  }
  return page.jobs;
}

async function open(jobId, image) {
  current = { job: null, image };
  const reuse = document.getElementById("reuse");
  reuse.disabled = true; // until the job's settings have come
  document.getElementById("viewer-image").src = image.url;
  status.textContent = "";
  const text = document.getElementById("infotext");
  text.textContent = "reading the infotext…";
  viewer.showModal();
  try {
    const [job, info] = await Promise.all([get(`/v1/jobs/${jobId}`),
      imageBlob(image.url).then(fileBase64).then((data) => post("/v1/png-info", { image: data }))]);
    if (current.image !== image) return;
    current.job = job;
    text.textContent = info.info;
    reuse.disabled = false;
  } catch (e) {
    text.textContent = "";
    status.textContent = e.message;
  }
}

// `actions.reuse(params, mode)` and `actions.send(blob, mode)` are the page's; the viewer only calls them.
export function setupViewer(actions) {
  const close = () => viewer.close();
  document.getElementById("viewer-close").addEventListener("click", close);
  document.getElementById("copy-seed").addEventListener("click", async () => {
    const seed = String(current.image.seed);
    try {
      await navigator.clipboard.writeText(seed);
      status.textContent = `seed ${seed} copied`;
    } catch (e) {
      status.textContent = `seed ${seed} (the browser did not allow copying)`;
    }
  });
  document.getElementById("reuse").addEventListener("click", () => {
    actions.reuse({ ...current.job.params, seed: current.image.seed, batch_size: 1, batch_count: 1 }, current.job.mode);
    close();
  });
  for (const mode of ["img2img", "inpaint"]) {
    document.getElementById(`to-${mode}`).addEventListener("click", async () => {
      actions.send(await imageBlob(current.image.url), mode);
      close();
    });
  }
}
