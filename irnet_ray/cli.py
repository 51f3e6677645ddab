"""The `irnet-ray` command line. Commands parse flags and call the package; no logic here."""

from __future__ import annotations

import argparse
import dataclasses
import sys



def _add_demo_parser(commands) -> None:
    from irnet_ray.demo import DemoConfig

    defaults = DemoConfig()
    parser = commands.add_parser(
        "demo",
        help="run the whole method on the built-in synthetic set and print the evaluation table",
        description=(
            "Train CAM on image-level labels, mine inter-pixel relations (dense CRF), train IRNet, "
            "synthesize semantic and instance pseudo labels and evaluate them against the built-in "
            "set's held-back masks. The defaults finish in about 10 minutes on 2 CPU cores."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=defaults.data.num_images, help="number of synthetic images")
    parser.add_argument("--image-size", type=int, default=defaults.data.image_size[0], help="square image side in pixels")
    parser.add_argument("--classes", type=int, default=defaults.data.num_classes, help="number of foreground classes (1-8)")
    parser.add_argument("--seed", type=int, default=defaults.data.seed, help="dataset and training seed")
    parser.add_argument("--arch", default=defaults.backbone.arch, help="resnet18, resnet34, resnet50 or resnet101")
    parser.add_argument("--weights", default=None, help="backbone weights: torchvision enum name or local .pth file")
    parser.add_argument("--cam-epochs", type=int, default=defaults.cam_train.epochs)
    parser.add_argument("--cam-batch-size", type=int, default=defaults.cam_train.batch_size)
    parser.add_argument("--cam-lr", type=float, default=defaults.cam_train.lr)
    parser.add_argument("--cam-backbone-lr-scale", type=float, default=defaults.cam_train.backbone_lr_scale)
    parser.add_argument("--cam-crop", type=int, default=defaults.cam_train.crop_size, help="CAM training crop side")
    parser.add_argument("--cam-long-side", default="%d,%d" % defaults.cam_train.rescale_long_side,
                        help="CAM training: random long side range MIN,MAX before cropping")
    parser.add_argument("--cam-scales", default=",".join(str(s) for s in defaults.cam_inference.scales),
                        help="comma-separated CAM inference scales")
    parser.add_argument("--irn-epochs", type=int, default=defaults.irn_train.epochs)
    parser.add_argument("--irn-batch-size", type=int, default=defaults.irn_train.batch_size)
    parser.add_argument("--irn-lr", type=float, default=defaults.irn_train.lr)
    parser.add_argument("--irn-crop", type=int, default=defaults.irn_train.crop_size, help="IRNet training crop side")
    parser.add_argument("--irn-displacement-lr-scale", type=float, default=defaults.irn_train.displacement_lr_scale)
    parser.add_argument("--pair-radius", type=int, default=defaults.relations.radius,
                        help="radius of the training pairs on the stride-4 grid (gamma of Eq. 2)")
    parser.add_argument("--walk-steps", type=int, default=defaults.synthesis.steps, help="random walk iterations t")
    parser.add_argument("--beta", type=float, default=defaults.synthesis.beta)
    parser.add_argument("--sem-bg", type=float, default=defaults.synthesis.sem_background_threshold,
                        help="background score of the propagated semantic maps")
    parser.add_argument("--ins-bg", type=float, default=defaults.synthesis.ins_background_threshold,
                        help="background score of the propagated instance maps")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads (0: default)")
    parser.add_argument("--report", default=None, help="also write the figures as JSON to this file")
    parser.set_defaults(handler=_run_demo)


def _demo_config(args) -> "DemoConfig":
    from irnet_ray.demo import DemoConfig

    defaults = DemoConfig()
    scales = _numbers("--cam-scales", args.cam_scales, float)
    long_side = _numbers("--cam-long-side", args.cam_long_side, int)
    if len(long_side) != 2:
        raise ValueError(f"--cam-long-side must be MIN,MAX, got {args.cam_long_side!r}")
    side = args.image_size
    return dataclasses.replace(
        defaults,
        data=dataclasses.replace(defaults.data, num_images=args.images, image_size=(side, side),
                                 num_classes=args.classes, seed=args.seed),
        backbone=dataclasses.replace(defaults.backbone, arch=args.arch, weights=args.weights),
        cam_train=dataclasses.replace(defaults.cam_train, epochs=args.cam_epochs, batch_size=args.cam_batch_size,
                                      lr=args.cam_lr, backbone_lr_scale=args.cam_backbone_lr_scale, seed=args.seed,
                                      crop_size=args.cam_crop, rescale_long_side=long_side),
        cam_inference=dataclasses.replace(defaults.cam_inference, scales=scales),
        irn_train=dataclasses.replace(defaults.irn_train, epochs=args.irn_epochs, batch_size=args.irn_batch_size,
                                      lr=args.irn_lr, seed=args.seed, crop_size=args.irn_crop,
                                      displacement_lr_scale=args.irn_displacement_lr_scale),
        relations=dataclasses.replace(defaults.relations, radius=args.pair_radius),
        synthesis=dataclasses.replace(defaults.synthesis, steps=args.walk_steps, beta=args.beta,
                                      sem_background_threshold=args.sem_bg, ins_background_threshold=args.ins_bg),
        device=args.device,
        threads=args.threads,
    )


def _numbers(flag: str, text: str, kind: type) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def _run_demo(args) -> int:
    from irnet_ray.demo import run_demo, write_report

    try:
        config = _demo_config(args)  # configs validate themselves: fail before minutes of training
    except ValueError as error:
        print(f"irnet-ray demo: {error}", file=sys.stderr)
        return 2
    report = run_demo(config)
    if args.report:
        write_report(report, args.report)
        print(f"report written to {args.report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irnet-ray",
        description="Pixel-accurate pseudo masks from image-level labels (IRNet, CVPR 2019).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_demo_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
