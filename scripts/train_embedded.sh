#!/usr/bin/env bash
# Reproduce the embedded model (openldm/weights/shapes) from scratch with openldm's own trainer.
# Run from the repository root after `pip install .`; each stage resumes if interrupted
# (rerun the script: finished stages are skipped, a stopped one continues from its checkpoint).
set -euo pipefail

resume_flag() { [ -d "$1/checkpoints" ] && echo "--resume" || true; }

# 1. The autoencoder (writes runs/shapes-vae/vae.safetensors and latent_stats.json).
if [ ! -f runs/shapes-vae/vae.safetensors ]; then
  openldm train vae shapes-vae $(resume_flag runs/shapes-vae)
fi
# The preset's latent scale factor (openldm/config.py, SHAPES) must be 1 / the std it reports.
cat runs/shapes-vae/latent_stats.json

# 2. UNet and text encoder on the VAE's latents (writes runs/shapes-ldm/model.safetensors + tokenizer/):
# the config's 3,000 steps, then the same run resumed to 6,000 (its cosine schedule recomputed over
# 6,000 steps, a warm restart at about 57% of the peak rate), as the shipped model was trained.
ldm_step() {  # the newest checkpoint's step, 0 before the first
  local newest
  newest=$(ls runs/shapes-ldm/checkpoints 2>/dev/null | sed -n 's/^step-0*\([0-9][0-9]*\)\.pt$/\1/p' | sort -n | tail -1 || true)
  echo "${newest:-0}"
}
if [ "$(ldm_step)" -lt 3000 ]; then
  openldm train ldm shapes-ldm $(resume_flag runs/shapes-ldm)
fi
if [ "$(ldm_step)" -lt 6000 ]; then
  openldm train ldm shapes-ldm --resume --steps 6000
fi

# 3. Ship it in half precision.
openldm convert runs/shapes-ldm/model.safetensors openldm/weights/shapes/model.safetensors --to single-file --dtype fp16
rm -rf openldm/weights/shapes/tokenizer && cp -r runs/shapes-ldm/tokenizer openldm/weights/shapes/tokenizer
cp runs/shapes-ldm/domain.json openldm/weights/shapes/domain.json
openldm eval shapes --model openldm/weights/shapes --n 200 --grid docs/shapes-grid.png --json docs/shapes-eval.json

# 4. Free phrasing (issue 17): fine-tune the shipped model on the phrasing grammar, then ship that.
if [ ! -f runs/shapes-ldm-phrasing/model.safetensors ]; then
  openldm train ldm shapes-ldm-phrasing $(resume_flag runs/shapes-ldm-phrasing)
fi
openldm convert runs/shapes-ldm-phrasing/model.safetensors openldm/weights/shapes/model.safetensors --to single-file --dtype fp16
# its vocabulary grew (ldm.extend_vocabulary: each of the grammar's words is one token)
rm -rf openldm/weights/shapes/tokenizer && cp -r runs/shapes-ldm-phrasing/tokenizer openldm/weights/shapes/tokenizer
cp runs/shapes-ldm-phrasing/domain.json openldm/weights/shapes/domain.json  # the grammar's words: no warning for "big"
openldm eval shapes --model openldm/weights/shapes --n 200 --grid docs/shapes-grid.png --json docs/shapes-eval.json

# 5. Second phrasing fine-tune (issue 17): new scenes, more two-shape scenes, "background X" closings.
if [ ! -f runs/shapes-ldm-phrasing-2/model.safetensors ]; then
  openldm train ldm shapes-ldm-phrasing-2 $(resume_flag runs/shapes-ldm-phrasing-2)
fi
openldm convert runs/shapes-ldm-phrasing-2/model.safetensors openldm/weights/shapes/model.safetensors --to single-file --dtype fp16
rm -rf openldm/weights/shapes/tokenizer && cp -r runs/shapes-ldm-phrasing-2/tokenizer openldm/weights/shapes/tokenizer
cp runs/shapes-ldm-phrasing-2/domain.json openldm/weights/shapes/domain.json
openldm eval shapes --model openldm/weights/shapes --n 200 --grid docs/shapes-grid.png --json docs/shapes-eval.json
