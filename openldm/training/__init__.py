"""training"""

# what `openldm train KIND` trains (each has its section in a TrainConfig); here, not in `config`, so
# that declaring the CLI's commands does not build the config's dataclasses
KINDS = ("vae", "ldm", "lora", "embedding")
