"""`openldm train vae|ldm|lora|embedding CONFIG [--resume]`: the training subcommands."""

from __future__ import annotations

import argparse

from openldm.training import KINDS


def add_commands(sub) -> None:
    parser = sub.add_parser("train", help="train a VAE, a latent diffusion model, a LoRA or an embedding "
                                          "from a YAML/TOML config",
                            description="Train from a config file, or a shipped config by name (shapes-vae, "
                                        "shapes-ldm). Its relative paths start from its folder, "
                                        "run.output_dir from the working directory. Checkpoints "
                                        "go to run.output_dir/checkpoints; --resume continues the newest "
                                        "one.")
    parser.add_argument("kind", choices=KINDS, help="what to train")
    parser.add_argument("config", help="YAML or TOML training config, or a shipped config's name")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--steps", type=int, help="override run.steps")
    parser.add_argument("--output-dir", help="override run.output_dir")
    parser.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from openldm.training.config import load_config
    from openldm.training.determinism import prepare_environment, wanted
    from openldm.training.run import train

    config = load_config(args.config, kind=args.kind)
    given = (("steps", args.steps), ("output_dir", args.output_dir))
    overrides = {k: v for k, v in given if v is not None}
    if overrides:
        config = replace(config, run=replace(config.run, **overrides))
    if wanted(config.run):
        prepare_environment()  # before any kernel: MKL reads MKL_CBWR once, at its first call
    train(config, resume=args.resume)
    return 0
