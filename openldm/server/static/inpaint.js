// The input image and the mask painted over it: white where the model repaints, exported as a PNG.

const wrap = document.getElementById("canvas-wrap");
const picture = document.getElementById("input-image");
const canvas = document.getElementById("mask");
const context = canvas.getContext("2d");
let inputBlob = null;

export function setInput(blob) {
  inputBlob = blob;
  return new Promise((resolve, reject) => {
    picture.onload = () => {
      canvas.width = picture.naturalWidth;
      canvas.height = picture.naturalHeight;
      wrap.hidden = false;
      resolve();
    };
    picture.onerror = () => reject(new Error("the input file is not an image the browser can read"));
    picture.src = URL.createObjectURL(blob);
  });
}

export const input = () => inputBlob;

function point(event) {
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width,
    (event.clientY - box.top) * canvas.height / box.height];
}

function stroke(from, to) {
  const eraser = document.getElementById("eraser").checked;
  const brush = Number(document.getElementById("brush").value);
  context.globalCompositeOperation = eraser ? "destination-out" : "source-over";
  context.strokeStyle = "#fff";
  context.lineCap = "round";
  context.lineWidth = brush * canvas.width / canvas.getBoundingClientRect().width;
  context.beginPath();
  context.moveTo(...from);
  context.lineTo(...to);
  context.stroke();
}

// Inverting and exporting both look at alpha only: painted is opaque, the rest transparent.
function mapAlpha(f) {
  const data = context.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 3; i < data.data.length; i += 4) {
    const a = f(data.data[i]);
    data.data[i - 3] = data.data[i - 2] = data.data[i - 1] = 255;
    data.data[i] = a;
  }
  context.putImageData(data, 0, 0);
}

export function maskBlob() {
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const source = context.getImageData(0, 0, canvas.width, canvas.height);
  const target = out.getContext("2d").createImageData(canvas.width, canvas.height);
  for (let i = 0; i < source.data.length; i += 4) {
    const v = source.data[i + 3] >= 128 ? 255 : 0;
    target.data[i] = target.data[i + 1] = target.data[i + 2] = v;
    target.data[i + 3] = 255;
  }
  out.getContext("2d").putImageData(target, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

export function maskIsEmpty() {
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return false;
  return true;
}

export function setupMask() {
  let last = null;
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = point(e);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (last === null) return;
    const next = point(e);
    stroke(last, next);
    last = next;
  });
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { last = null; });
  document.getElementById("mask-clear").addEventListener("click",
    () => context.clearRect(0, 0, canvas.width, canvas.height));
  document.getElementById("mask-invert").addEventListener("click", () => mapAlpha((a) => 255 - a));
}
