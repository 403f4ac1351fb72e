"""``kissray init``: a new checkpoint with random or given backbone weights and an untrained head."""

from __future__ import annotations

import argparse

from kissray.commands.options import any_int, image_size, positive_int

from kissray.defaults import FRAMES_PER_CLIP, IMAGE_SIZE_PX, MODALITIES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a checkpoint (random or given backbones, untrained head)",
                       description=__doc__)
    p.add_argument("--out", required=True, help="checkpoint directory (any fsspec URI)")
    p.add_argument("--labels", default="kiss", help="comma-separated label names (default: kiss)")
    p.add_argument("--modality", choices=MODALITIES, default="av")
    p.add_argument("--frames-per-clip", type=positive_int, default=FRAMES_PER_CLIP,
                   help="stills per 1-second clip (default %(default)s)")
    p.add_argument("--image-size", type=image_size, default=IMAGE_SIZE_PX, help="still size in pixels (default %(default)s)")
    p.add_argument("--resnet-weights", default=None,
                   help="'imagenet' (torchvision's IMAGENET1K_V1, downloaded on request) or a state-dict URI")
    p.add_argument("--vggish-weights", default=None,
                   help="'audioset' (torchvggish release, SHA-256 checked) or a state-dict URI")
    p.add_argument("--seed", type=any_int, default=0, help="seed for the random initialisation")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kissray.model import ModelConfig, init_model, save_model

    labels = [name.strip() for name in args.labels.split(",") if name.strip()]
    config = ModelConfig(labels=labels, modality=args.modality, frames_per_clip=args.frames_per_clip,
                         image_size=args.image_size)
    model = init_model(config, args.resnet_weights, args.vggish_weights, seed=args.seed)
    save_model(model, args.out)
    print(f"wrote {args.out}: labels={labels} modality={args.modality} "
          f"resnet={args.resnet_weights or 'random'} vggish={args.vggish_weights or 'random'}; "
          "its head was never trained: train it (`kissray train --init`) before trusting its scores")
    return 0
