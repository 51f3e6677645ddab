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
            "set's held-back masks. The defaults finish in 12-17 minutes on 2 CPU cores."
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
    parser.add_argument("--train-workers", type=int, default=defaults.train_workers, help="Ray Train workers")
    parser.add_argument("--label-actors", type=int, default=defaults.label_actors, help="labeling actors at most")
    parser.add_argument("--panels", type=int, default=defaults.panels, help="Fig. 6 panels of the first images")
    parser.add_argument("--workdir", default="runs/demo",
                        help="models, IR labels, pseudo masks and panels go under WORKDIR/<settings id>/; "
                             "a rerun with the same settings resumes")
    parser.add_argument("--output", default=None,
                        help="where the Parquet pseudo masks go (default WORKDIR/<settings id>/labels; local or s3://)")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// outputs")
    parser.add_argument("--report", default=None, help="also write the figures as JSON to this file")
    parser.set_defaults(handler=_run_demo)


def _demo_config(args):
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
        train_workers=args.train_workers,
        label_actors=args.label_actors,
        panels=args.panels,
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
    from irnet_ray.data.storage import StorageOptions

    def job() -> int:
        report = run_demo(config, workdir=args.workdir, output=args.output,
                          storage_options=StorageOptions(endpoint_url=args.endpoint_url))  # fmt: skip
        if args.report:
            write_report(report, args.report)
            print(f"report written to {args.report}")
        return 0

    return _run_job("demo", args, job)


def _add_benchmark_parser(commands) -> None:
    from irnet_ray.suite import FAMILIES

    parser = commands.add_parser(
        "benchmark",
        help="run the whole method on synthetic families that each stress one weakness and print one table",
        description=(
            "The quality benchmark suite: every stage (as `irnet-ray demo` runs it, same settings) on each "
            "synthetic family, generated on the fly with a fixed seed; one table of CAM and pseudo-label mIoU and "
            "instance AP^r_50/70 of the baselines and the full method, with the targets (pseudo labels >= CAM "
            "+ 15 mIoU, full AP^r_50 >= 4x CAM + components). Families: "
            + "; ".join(f"{f.name}: {f.stresses}" for f in FAMILIES)
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--families", default=",".join(f.name for f in FAMILIES),
                        help="comma-separated families to run")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    parser.add_argument("--smoke", action="store_true",
                        help="every family tiny (12 images of 64 px, one epoch a stage): checks that it runs, measures nothing")
    parser.add_argument("--workdir", default="runs/benchmark", help="where each family's runs and labels go (resumed)")
    parser.add_argument("--report", default=None, help="also write the results as JSON to this local file")

    def run(args) -> int:
        from irnet_ray.suite import format_suite, run_suite

        names = [n.strip() for n in args.families.split(",") if n.strip()]
        known = {f.name for f in FAMILIES}
        if not names or any(n not in known for n in names):
            print(f"irnet-ray benchmark: --families must name some of {', '.join(sorted(known))}, got {args.families!r}",
                  file=sys.stderr)  # fmt: skip
            return 2

        def job() -> int:
            result = run_suite(names, args.workdir, seed=args.seed, smoke=args.smoke, log=_progress_line)
            print(format_suite(result))
            if args.report:
                import json
                from pathlib import Path

                Path(args.report).parent.mkdir(parents=True, exist_ok=True)
                Path(args.report).write_text(json.dumps(result, indent=2, sort_keys=True))
                print(f"report written to {args.report}")
            return 0

        return _run_job("benchmark", args, job)

    parser.set_defaults(handler=run)


def _add_visualize_parser(commands) -> None:
    from irnet_ray.config import VISUALIZE_DEFAULT_LIMIT as DEFAULT_LIMIT
    from irnet_ray.config import VISUALIZE_DEFAULT_MAX_SIDE as DEFAULT_MAX_SIDE
    from irnet_ray.config import VISUALIZE_FIGURE_NAME as FIGURE_NAME
    from irnet_ray.config import SynthesisConfig

    walk = SynthesisConfig()
    parser = commands.add_parser(
        "visualize",
        help="write Fig. 6 panels (image, CAM, displacement, boundary, instances, semantic) as PNGs",
        description=(
            "Run the trained CAM and IRNet models on chosen images and write one PNG row per image "
            f"plus {FIGURE_NAME} with all rows to a local folder or s3:// prefix."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", required=True, help="image set: builtin:..., manifest, folder, voc:... or URI")
    parser.add_argument("--cam", default=None, help="CAM model folder (default: the one the IRNet model names)")
    parser.add_argument("--irn", required=True, help="IRNet model folder")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for the PNGs")
    parser.add_argument("--ids", default=None, help="comma-separated image ids (default: the first --limit images)")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="images shown when --ids is not given")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="downscale images to this long side")
    parser.add_argument("--walk-steps", type=int, default=walk.steps, help="random walk iterations t")
    parser.add_argument("--displacement-iterations", type=int, default=walk.displacement_iterations)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint, e.g. http://localhost:9000")

    def run(args) -> int:
        from irnet_ray.data.storage import StorageOptions
        from irnet_ray.visualize import visualize_images

        try:
            written = visualize_images(
                args.images, args.cam, args.irn, args.output,
                image_ids=[i.strip() for i in args.ids.split(",") if i.strip()] if args.ids else None,
                limit=args.limit, max_side=args.max_side, device=args.device,
                storage_options=StorageOptions(endpoint_url=args.endpoint_url),
                synthesis_config=dataclasses.replace(
                    walk, steps=args.walk_steps, displacement_iterations=args.displacement_iterations
                ),
            )  # fmt: skip
        except _user_errors() as error:
            return _fail("visualize", error)
        print(f"{len(written) - 1} panel(s) written; all rows in {written[-1]}")
        return 0

    parser.set_defaults(handler=run)


# --------------------------------------------------------------------------------------
# shared flags of the distributed commands

def _auto_int(text: str) -> int | None:
    """An integer flag that also takes ``auto`` (``None``: sized from the cluster)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _user_errors() -> tuple:
    from irnet_ray.data.storage import StorageError

    return (ValueError, TypeError, StorageError, OSError)


def _fail(command: str, error: BaseException) -> int:
    """A user mistake: one line on stderr, exit status 2, no traceback."""
    print(f"irnet-ray {command}: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
    return 2


def _add_column_flags(parser) -> None:
    group = parser.add_argument_group("manifest columns (for a manifest image set)")
    # No argparse defaults: the reader's own (image, classes, image_id) apply unless a flag is given.
    group.add_argument("--image-column", help="column of the image paths or URIs (default: image)")
    group.add_argument("--classes-column",
                       help="column of the class names, separated by | or ;, or a JSON list (default: classes)")
    group.add_argument("--id-column", help="column of the image ids (default: image_id, else the file names)")


def _manifest_columns(args) -> dict:
    """The manifest reader's column arguments given on the command line."""
    given = {name: getattr(args, name) for name in ("image_column", "classes_column", "id_column")}
    given = {name: value for name, value in given.items() if value is not None}
    if given:
        from irnet_ray.data.sources import is_manifest_spec

        if not is_manifest_spec(args.images):
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{flags} name columns of a manifest table; {args.images!r} is not a manifest "
                             "(.parquet, .csv, .jsonl or manifest:URI)")  # fmt: skip
    return given


def _add_storage_flags(parser) -> None:
    group = parser.add_argument_group("storage and cluster")
    group.add_argument("--endpoint-url", default=None,
                       help="S3-compatible endpoint (e.g. http://minio:9000); credentials come from the AWS chain")
    group.add_argument("--region", default=None, help="S3 region (default: the AWS chain)")
    group.add_argument("--ray-address", default=None,
                       help="Ray cluster to join; local: a private one (default: the job's cluster under `ray job "
                            "submit`, else one `ray start` left running here, else a private one)")
    group.add_argument("--summary", default=None, help="also write the job summary as JSON to this local file")


def _add_output_flags(parser) -> None:
    """The flags of a job that writes a committed output folder (label, mine-relations)."""
    from irnet_ray.pipeline.lease import LeaseConfig

    lease = LeaseConfig()
    group = parser.add_argument_group("output lease (one writing run per output folder)")
    group.add_argument("--lease-heartbeat", type=float, default=lease.heartbeat_s,
                       help="seconds between renewals of this run's lease on OUTPUT")
    group.add_argument("--lease-timeout", type=float, default=lease.timeout_s,
                       help="a lease not renewed for this many seconds belongs to a dead run and is taken over")
    group.add_argument("--take-over-lease", action="store_true",
                       help="take OUTPUT's lease even from a run that looks alive (only when you know it is dead)")
    group.add_argument("--allow-local-output-on-cluster", action="store_true",
                       help="write a local OUTPUT from a multi-node cluster (only if the path is shared, e.g. NFS)")


def _lease_config(args):
    from irnet_ray.pipeline.lease import LeaseConfig

    return LeaseConfig(heartbeat_s=args.lease_heartbeat, timeout_s=args.lease_timeout, take_over=args.take_over_lease)


def _add_worker_flags(parser, defaults_workers: int = 1) -> None:
    group = parser.add_argument_group("Ray Train workers")
    group.add_argument("--num-workers", type=int, default=defaults_workers, help="training workers (DDP)")
    group.add_argument("--gpus-per-worker", type=float, default=None,
                       help="GPUs per worker; 0 trains on CPU (default: 1 when the cluster has GPUs, else 0)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (may be fractional)")
    group.add_argument("--max-failures", type=int, default=2,
                       help="worker-group restarts from the last checkpoint before the run fails (-1: no limit)")
    group.add_argument("--stream", action="store_true",
                       help="decode the images every epoch instead of once (for sets larger than the object store)")


def _storage_options(args):
    from irnet_ray.data.storage import StorageOptions

    return StorageOptions(endpoint_url=args.endpoint_url, region=args.region)


def _connect(args) -> None:
    from irnet_ray.train.ray_train import ensure_ray

    ensure_ray(address=args.ray_address)


def _gpus(requested: float | None) -> float:
    """GPUs per training worker: as requested, else 1 when the cluster's GPU nodes have CUDA."""
    if requested is not None:
        return float(requested)
    from irnet_ray.pipeline.resources import cluster_gpus

    if cluster_gpus() <= 0:
        return 0.0
    if not _cuda_on_gpu_nodes():
        print("warning: the cluster declares GPUs but torch sees no CUDA device on them: training on CPU "
              "(--gpus-per-worker 1 insists on the GPUs)", file=sys.stderr)  # fmt: skip
        return 0.0
    return 1.0


def _cuda_on_gpu_nodes(timeout_s: float = 120.0) -> bool:
    """Whether torch finds CUDA on a node that offers the ``GPU`` resource. Ray Train's NCCL
    process group fails on a node whose GPUs are declared (``--num-gpus``) but not usable by
    torch; inference actors fall back to the CPU by themselves. True when no GPU frees up in time."""
    import ray

    @ray.remote(num_gpus=0.001, num_cpus=0, max_retries=0)
    def probe() -> bool:
        import torch

        return bool(torch.cuda.is_available())

    ref = probe.remote()
    try:
        return bool(ray.get(ref, timeout=timeout_s))
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return True


def _scaling(args):
    from irnet_ray.train.ray_train import ScalingOptions

    gpus = _gpus(args.gpus_per_worker)
    return ScalingOptions(num_workers=args.num_workers, use_gpu=gpus > 0, cpus_per_worker=args.cpus_per_worker,
                          gpus_per_worker=gpus or 1.0)  # fmt: skip


def _run_options(args):
    """The run's storage, probed before Ray starts: a wrong endpoint or bucket fails in seconds."""
    from irnet_ray.data.storage import exists
    from irnet_ray.train.ray_train import RunOptions

    run = RunOptions(args.run_name, args.storage, storage_options=_storage_options(args),
                     max_failures=args.max_failures)  # fmt: skip
    exists(run.run_uri, run.storage_options)
    return run


def _add_inputs_flag(parser, default: str = "auto (ray)") -> None:
    parser.add_argument("--inputs", choices=("auto", "ray", "driver"), default="auto",
                        help="where a manifest or folder: tree is read and planned: ray (Ray Data blocks in the object "
                             "store; the driver holds 8 bytes a row), driver (pyarrow in this process), " + default)
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray Data's own progress output (by default only ours: images done, images/s, "
                             "ETA every 10 s)")


def _progress_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_image_set(args):
    from irnet_ray.data.sources import ClassVocabulary, load_records

    vocabulary = None
    if getattr(args, "vocabulary", None):
        from irnet_ray.data.storage import read_bytes

        vocabulary = ClassVocabulary.from_json(read_bytes(args.vocabulary, _storage_options(args)))
    records, vocabulary = load_records(args.images, _storage_options(args), vocabulary, **_manifest_columns(args))
    return records, vocabulary


def _finish(command: str, summary: dict, args, lines: list[str]) -> int:
    import json

    for line in lines:
        print(line)
    if args.summary:
        from pathlib import Path

        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
        print(f"summary written to {args.summary}")
    return 0


def _error_lines(errors: list[dict]) -> list[str]:
    if not errors:
        return []
    from irnet_ray.data.images import summarize_errors

    return [f"  {len(errors)} image(s) could not be used: {summarize_errors(errors)}"]


def _run_job(command: str, args, job) -> int:
    """Run ``job()``; user mistakes become one line and status 2, a failed run (training, or a
    pipeline that failed or had too many errors) status 1."""
    from irnet_ray.pipeline.run import PipelineFailed
    from irnet_ray.train.ray_train import TrainingJobError

    try:
        return job()
    except (TrainingJobError, PipelineFailed) as error:  # not a user mistake: status 1, committed work is kept
        print(f"irnet-ray {command}: {error}", file=sys.stderr)
        return 1
    except _user_errors() as error:
        return _fail(command, error)


# --------------------------------------------------------------------------------------
# train-cam, mine-relations, train-irn


def _add_train_cam_parser(commands) -> None:
    from irnet_ray.config import BackboneConfig, CamTrainConfig

    backbone, train = BackboneConfig(), CamTrainConfig()
    parser = commands.add_parser(
        "train-cam",
        help="train the CAM classifier on image-level labels with Ray Train",
        description=(
            "Train the CAM network (ResNet, output stride 16) on image-level labels with Ray Train: DDP "
            "workers, a checkpoint every epoch under STORAGE/RUN_NAME, restarts from the last checkpoint "
            "when a worker dies, and a rerun with the same run name resumes. The final model is written to "
            "STORAGE/RUN_NAME/model/."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", required=True,
                        help="image set: builtin[:key=value,...], manifest (.parquet/.csv/.jsonl), folder:ROOT, voc:ROOT[?split=train_aug]")
    parser.add_argument("--vocabulary", default=None, help="JSON list of class names fixing the class ids (optional)")
    parser.add_argument("--storage", required=True, help="run storage: local folder or s3://bucket/prefix")
    parser.add_argument("--run-name", required=True, help="run name; rerunning with the same name resumes")
    parser.add_argument("--arch", default=backbone.arch, help="resnet18, resnet34, resnet50 or resnet101")
    parser.add_argument("--weights", default=backbone.weights,
                        help="initial backbone weights: torchvision enum name (IMAGENET1K_V1) or a local .pth file")
    parser.add_argument("--from-scratch", action="store_true",
                        help="no pretrained weights: train every stage and BatchNorm with batch statistics "
                             "(what --train-batchnorm --first-trainable-stage 0 set)")
    parser.add_argument("--train-batchnorm", action="store_true",
                        help="train BatchNorm with batch statistics (needed from scratch; the paper freezes it)")
    parser.add_argument("--first-trainable-stage", type=int, default=backbone.first_trainable_stage,
                        help="backbone stages before this index stay fixed (0: train all)")
    parser.add_argument("--epochs", type=int, default=train.epochs)
    parser.add_argument("--batch-size", type=int, default=train.batch_size, help="per worker")
    parser.add_argument("--lr", type=float, default=train.lr)
    parser.add_argument("--backbone-lr-scale", type=float, default=train.backbone_lr_scale)
    parser.add_argument("--crop", type=int, default=train.crop_size)
    parser.add_argument("--long-side", default="%d,%d" % train.rescale_long_side,
                        help="random long side MIN,MAX before cropping")
    parser.add_argument("--seed", type=int, default=train.seed)
    _add_column_flags(parser)
    _add_worker_flags(parser)
    _add_storage_flags(parser)

    def run(args) -> int:
        from irnet_ray.train.ray_train import train_cam_job

        def job() -> int:
            long_side = _numbers("--long-side", args.long_side, int)
            if len(long_side) != 2:
                raise ValueError(f"--long-side must be MIN,MAX, got {args.long_side!r}")
            backbone_cfg = dataclasses.replace(
                backbone, arch=args.arch, weights=args.weights,
                frozen_batchnorm=not (args.train_batchnorm or args.from_scratch),
                first_trainable_stage=0 if args.from_scratch else args.first_trainable_stage)  # fmt: skip
            if args.from_scratch and args.weights:
                raise ValueError("--from-scratch trains random weights: drop --weights, or drop --from-scratch")
            backbone_cfg.check_trainable()
            train_cfg = dataclasses.replace(
                train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                backbone_lr_scale=args.backbone_lr_scale, crop_size=args.crop, rescale_long_side=long_side,
                seed=args.seed)  # fmt: skip
            run_options = _run_options(args)
            records, vocabulary = _load_image_set(args)
            _connect(args)
            summary = train_cam_job(records, vocabulary, backbone=backbone_cfg, train=train_cfg,
                                    scaling=_scaling(args), run=run_options, storage_options=_storage_options(args),
                                    cache_decoded=not args.stream)  # fmt: skip
            last = summary["final_metrics"]
            return _finish("train-cam", summary, args, [
                f"CAM model: {summary['model_uri']}"
                + (" (already complete)" if summary.get("already_complete") else ""),
                f"  {summary['images']} images, {len(summary['history'])} epochs, final loss {last.get('loss', float('nan')):.4f}"
                + (f", resumed from epoch {summary['resumed_from_epoch']}" if summary.get("resumed_from_epoch") else ""),
                *_error_lines(summary["errors"]),
            ])  # fmt: skip

        return _run_job("train-cam", args, job)

    parser.set_defaults(handler=run)


def _add_mine_relations_parser(commands) -> None:
    from irnet_ray.config import CamInferenceConfig, MiningOptions, RelationConfig

    cam, relations, mining = CamInferenceConfig(), RelationConfig(), MiningOptions()
    parser = commands.add_parser(
        "mine-relations",
        help="mine inter-pixel relations: CAMs refined by a dense CRF -> IR label Parquet",
        description=(
            "Ray Data job: decode images on CPU tasks, compute multi-scale CAMs on an actor pool (GPUs when "
            "the cluster has them), refine confident regions with a dense CRF on CPU tasks and write the IR "
            "label maps (PNG in Parquet) to OUTPUT, committed by OUTPUT/_manifest.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", required=True, help="image set (as for train-cam)")
    parser.add_argument("--vocabulary", default=None, help="JSON list of class names (default: the CAM model's)")
    parser.add_argument("--cam", required=True, help="CAM model folder (STORAGE/RUN_NAME/model of train-cam)")
    parser.add_argument("--output", required=True, help="output folder or s3:// prefix for the IR labels")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output in OUTPUT")
    parser.add_argument("--scales", default=",".join(str(s) for s in cam.scales), help="CAM inference scales")
    parser.add_argument("--fg-threshold", type=float, default=relations.fg_threshold)
    parser.add_argument("--bg-threshold", type=float, default=relations.bg_threshold)
    parser.add_argument("--crf-iterations", type=int, default=relations.crf_iterations)
    parser.add_argument("--max-error-rate", type=float, default=mining.max_error_rate,
                        help="share of the images that may fail; above it the run ends with an error and no manifest")
    parser.add_argument("--max-side", type=int, default=mining.max_side,
                        help="mine on images downscaled to this long side (labels are stored at full size)")
    group = parser.add_argument_group("Ray Data resources")
    group.add_argument("--min-actors", type=int, default=mining.min_actors, help="CAM actors kept at least")
    group.add_argument("--max-actors", type=_auto_int, default="auto",
                       help="CAM actors at most (autoscaling); auto: one per GPU of the cluster, or what fits its CPUs")
    group.add_argument("--gpus-per-actor", type=float, default=mining.gpus_per_actor, help="when the cluster has GPUs")
    group.add_argument("--cpus-per-actor", type=float, default=mining.cpus_per_actor)
    group.add_argument("--crf-cpus", type=float, default=mining.crf_cpus, help="CPUs per CRF task")
    group.add_argument("--batch-size", type=_auto_int, default="auto",
                       help="images per actor call; auto: 16 on a GPU, 4 on a CPU")
    group.add_argument("--rows-per-file", type=int, default=mining.rows_per_file)
    _add_column_flags(parser)
    _add_inputs_flag(parser)
    _add_output_flags(parser)
    _add_storage_flags(parser)

    def run(args) -> int:
        from irnet_ray import model_files
        from irnet_ray.data.sources import ClassVocabulary
        from irnet_ray.mining import mine_relations_job

        def job() -> int:
            options = _storage_options(args)
            model_files.read_model_meta(args.cam, options, "--cam")  # a wrong path fails before Ray starts
            vocabulary = None  # class names resolve to the ids the CAM model was trained with
            if args.vocabulary:
                from irnet_ray.data.storage import read_bytes

                vocabulary = ClassVocabulary.from_json(read_bytes(args.vocabulary, options))
            mining_options = dataclasses.replace(
                mining, max_side=args.max_side, min_actors=args.min_actors, max_actors=args.max_actors,
                gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, crf_cpus=args.crf_cpus,
                batch_size=args.batch_size, rows_per_file=args.rows_per_file,
                max_error_rate=args.max_error_rate)  # fmt: skip
            relations_cfg = dataclasses.replace(relations, fg_threshold=args.fg_threshold,
                                                bg_threshold=args.bg_threshold, crf_iterations=args.crf_iterations)
            cam_cfg = dataclasses.replace(cam, scales=_numbers("--scales", args.scales, float))
            _connect(args)
            summary = mine_relations_job(args.images, args.cam, args.output, cam_inference=cam_cfg,
                                         relations=relations_cfg, options=mining_options, storage_options=options,
                                         overwrite=args.overwrite, lease=_lease_config(args),
                                         allow_local_output_on_cluster=args.allow_local_output_on_cluster,
                                         vocabulary=vocabulary, manifest_columns=_manifest_columns(args),
                                         inputs=args.inputs, log=_progress_line, verbose=args.verbose)  # fmt: skip
            return _finish("mine-relations", summary, args, [
                f"IR labels: {summary['output']}" + (" (already complete)" if summary.get("already_complete") else ""),
                f"  {summary['mined']} of {summary['images']} images mined into {len(summary['files'])} file(s)",
                *_error_lines(summary["errors"]),
            ])  # fmt: skip

        return _run_job("mine-relations", args, job)

    parser.set_defaults(handler=run)


def _add_train_irn_parser(commands) -> None:
    from irnet_ray.config import IrnTrainConfig, RelationConfig

    train, relations = IrnTrainConfig(), RelationConfig()
    parser = commands.add_parser(
        "train-irn",
        help="train IRNet (boundary + displacement branches) on mined IR labels with Ray Train",
        description=(
            "Train IRNet's two branches on the frozen backbone of the CAM model, from the IR labels of "
            "mine-relations, with Ray Train (checkpoints, restarts and resume as for train-cam). The final "
            "model, with its mean displacement, is written to STORAGE/RUN_NAME/model/."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ir-labels", required=True, help="output folder of mine-relations (or IR label Parquet)")
    parser.add_argument("--cam", required=True, help="CAM model folder whose backbone IRNet is trained on")
    parser.add_argument("--storage", required=True, help="run storage: local folder or s3://bucket/prefix")
    parser.add_argument("--run-name", required=True, help="run name; rerunning with the same name resumes")
    parser.add_argument("--epochs", type=int, default=train.epochs)
    parser.add_argument("--batch-size", type=int, default=train.batch_size, help="per worker")
    parser.add_argument("--lr", type=float, default=train.lr)
    parser.add_argument("--displacement-lr-scale", type=float, default=train.displacement_lr_scale)
    parser.add_argument("--crop", type=int, default=train.crop_size)
    parser.add_argument("--pair-radius", type=int, default=relations.radius,
                        help="radius of the training pairs on the stride-4 grid (gamma of Eq. 2)")
    parser.add_argument("--max-side", type=int, default=None, help="downscale images to this long side first")
    parser.add_argument("--seed", type=int, default=train.seed)
    _add_worker_flags(parser)
    _add_storage_flags(parser)

    def run(args) -> int:
        from irnet_ray.train.ray_train import train_irn_job

        def job() -> int:
            train_cfg = dataclasses.replace(
                train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, crop_size=args.crop,
                displacement_lr_scale=args.displacement_lr_scale, seed=args.seed)  # fmt: skip
            run_options = _run_options(args)
            _connect(args)
            summary = train_irn_job(args.ir_labels, args.cam, irn=train_cfg,
                                    relations=dataclasses.replace(relations, radius=args.pair_radius),
                                    scaling=_scaling(args), run=run_options, storage_options=_storage_options(args),
                                    max_side=args.max_side, cache_decoded=not args.stream)  # fmt: skip
            last = summary["final_metrics"]
            return _finish("train-irn", summary, args, [
                f"IRNet model: {summary['model_uri']}"
                + (" (already complete)" if summary.get("already_complete") else ""),
                f"  {summary['images']} images, {len(summary['history'])} epochs, final loss {last.get('loss', float('nan')):.4f}, "
                f"mean displacement {summary.get('mean_displacement')}",
                *_error_lines(summary["errors"]),
            ])  # fmt: skip

        return _run_job("train-irn", args, job)

    parser.set_defaults(handler=run)


def _add_downstream_training_flags(parser, train) -> None:
    """The flags train-deeplab and train-maskrcnn share (``train``: the job's config defaults)."""
    parser.add_argument("--labels", required=True, help="the --output folder of a finished `irnet-ray label` run")
    parser.add_argument("--storage", required=True, help="run storage: local folder or s3://bucket/prefix")
    parser.add_argument("--run-name", required=True, help="run name; rerunning with the same name resumes")
    parser.add_argument("--backbone-weights", default=None,
                        help="a torchvision ResNet-50 state dict (.pth, local or s3://) the backbone starts from "
                             "(default: from scratch)")
    parser.add_argument("--epochs", type=int, default=train.epochs)
    parser.add_argument("--batch-size", type=int, default=train.batch_size, help="per worker")
    parser.add_argument("--lr", type=float, default=train.lr)
    parser.add_argument("--max-side", type=int, default=None, help="downscale images (and targets) to this long side")
    parser.add_argument("--seed", type=int, default=train.seed)


def _run_downstream_training(command: str, args, job_function, train_cfg) -> int:
    """Check the labels (no Ray needed), start Ray, train; one summary line."""

    def job() -> int:
        from irnet_ray.downstream.runs import open_labels

        run_options = _run_options(args)
        open_labels(args.labels, _storage_options(args))  # an unfinished or empty run fails before Ray starts
        _connect(args)
        summary = job_function(args.labels, train=train_cfg, scaling=_scaling(args), run=run_options,
                               storage_options=_storage_options(args), max_side=args.max_side,
                               cache_decoded=not args.stream)  # fmt: skip
        last = summary["final_metrics"]
        return _finish(command, summary, args, [
            f"{summary['kind']} model: {summary['model_uri']}"
            + (" (already complete)" if summary.get("already_complete") else ""),
            f"  {summary['images']} images, {len(summary['history'])} epochs, final loss {last.get('loss', float('nan')):.4f}"
            + (f", resumed from epoch {summary['resumed_from_epoch']}" if summary.get("resumed_from_epoch") else ""),
            *_error_lines(summary["errors"]),
        ])  # fmt: skip

    return _run_job(command, args, job)


def _add_train_deeplab_parser(commands) -> None:
    from irnet_ray.config import DeepLabTrainConfig

    train = DeepLabTrainConfig()
    parser = commands.add_parser(
        "train-deeplab",
        help="train torchvision's DeepLabv3 (ResNet-50) on the semantic pseudo masks with Ray Train",
        description=(
            "Train deeplabv3_resnet50 on the class-index maps of a finished labeling run (the files its "
            "_manifest.json lists; 255 is ignored by the loss) with Ray Train: DDP workers, a checkpoint every "
            "epoch under STORAGE/RUN_NAME, and a rerun with the same run name resumes. The final model is "
            "written to STORAGE/RUN_NAME/model/. See docs/downstream.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_downstream_training_flags(parser, train)
    parser.add_argument("--crop", type=int, default=train.crop_size)
    parser.add_argument("--rescale", default="%g,%g" % train.rescale, help="random rescale factor MIN,MAX")
    parser.add_argument("--no-aux-loss", action="store_true", help="no auxiliary head (torchvision's reference has it)")
    parser.add_argument("--ignore-below", type=float, default=train.ignore_below,
                        help="pixels of instances scoring below this are ignored (255)")
    _add_worker_flags(parser)
    _add_storage_flags(parser)

    def run(args) -> int:
        from irnet_ray.train.ray_train import train_deeplab_job

        try:
            rescale = _numbers("--rescale", args.rescale, float)
            if len(rescale) != 2:
                raise ValueError(f"--rescale must be MIN,MAX, got {args.rescale!r}")
            train_cfg = dataclasses.replace(
                train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, crop_size=args.crop,
                rescale=rescale, aux_loss=not args.no_aux_loss, ignore_below=args.ignore_below,
                backbone_weights=args.backbone_weights, seed=args.seed)  # fmt: skip
        except ValueError as error:
            return _fail("train-deeplab", error)
        return _run_downstream_training("train-deeplab", args, train_deeplab_job, train_cfg)

    parser.set_defaults(handler=run)


def _add_train_maskrcnn_parser(commands) -> None:
    from irnet_ray.config import MaskRcnnTrainConfig

    train = MaskRcnnTrainConfig()
    parser = commands.add_parser(
        "train-maskrcnn",
        help="train torchvision's Mask R-CNN (ResNet-50 FPN) on the instance pseudo masks with Ray Train",
        description=(
            "Train maskrcnn_resnet50_fpn on the instances of a finished labeling run (the files its "
            "_manifest.json lists; instances below --score-threshold or --min-area dropped, boxes from the "
            "masks) with Ray Train: DDP workers, a checkpoint every epoch under STORAGE/RUN_NAME, and a rerun "
            "with the same run name resumes. The final model is written to STORAGE/RUN_NAME/model/. See "
            "docs/downstream.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_downstream_training_flags(parser, train)
    parser.add_argument("--min-size", type=int, default=train.min_size, help="the model resizes images to this short side")
    parser.add_argument("--max-size", type=int, default=train.max_size, help="... and at most this long side")
    parser.add_argument("--score-threshold", type=float, default=train.score_threshold,
                        help="drop instances scoring below this (0 marks tiny fragments)")
    parser.add_argument("--min-area", type=int, default=train.min_area, help="drop instances smaller than this (pixels)")
    parser.add_argument("--trainable-backbone-layers", type=int, default=None,
                        help="backbone stages trained, 0-5 (default: 5 from scratch, 3 with --backbone-weights)")
    _add_worker_flags(parser)
    _add_storage_flags(parser)

    def run(args) -> int:
        from irnet_ray.train.ray_train import train_maskrcnn_job

        try:
            train_cfg = dataclasses.replace(
                train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_size=args.min_size,
                max_size=args.max_size, score_threshold=args.score_threshold, min_area=args.min_area,
                trainable_backbone_layers=args.trainable_backbone_layers, backbone_weights=args.backbone_weights,
                seed=args.seed)  # fmt: skip
        except ValueError as error:
            return _fail("train-maskrcnn", error)
        return _run_downstream_training("train-maskrcnn", args, train_maskrcnn_job, train_cfg)

    parser.set_defaults(handler=run)


def _add_label_parser(commands) -> None:
    from irnet_ray.label.config import LabelJobConfig

    defaults = LabelJobConfig()
    parser = commands.add_parser(
        "label",
        help="label an image set: semantic + instance pseudo masks as Parquet (Ray Data actor pool)",
        description=(
            "Decode images on CPU tasks, label them on an actor pool that loads the CAM and IRNet models once "
            "per actor (GPUs when the cluster has them), and stream the masks as Parquet to OUTPUT/data/. Each "
            "file is committed as it is written; OUTPUT/_manifest.json is written when every image is labeled "
            "or in OUTPUT/errors/. Rerunning the same command labels only what is missing."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", required=True,
                        help="image set: builtin[:key=value,...], manifest (.parquet/.csv/.jsonl), folder:ROOT, voc:ROOT[?split=train_aug]")
    parser.add_argument("--cam", default=None, help="CAM model folder (default: the one the IRNet model names)")
    parser.add_argument("--irn", required=True, help="IRNet model folder (STORAGE/RUN_NAME/model of train-irn)")
    parser.add_argument("--output", required=True, help="output folder or s3:// prefix")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an earlier output in OUTPUT and start over (needed to change models or settings)")
    parser.add_argument("--max-side", type=int, default=defaults.max_side,
                        help="label images downscaled to this long side (masks are stored at the original size)")
    parser.add_argument("--scales", default=",".join(str(s) for s in defaults.cam_inference.scales),
                        help="CAM inference scales (must include 1.0)")
    parser.add_argument("--walk-steps", type=int, default=defaults.synthesis.steps, help="random walk iterations t")
    parser.add_argument("--no-eval", action="store_true", help="do not score the labels against ground truth")
    parser.add_argument("--max-error-rate", type=float, default=defaults.max_error_rate,
                        help="share of the images that may fail; above it the run ends with status 1 and no manifest")
    parser.add_argument("--dry-run", action="store_true",
                        help="read the image set and the output's commit log, print how many images would be labeled, "
                             "skipped, refused (per reason), retried and changed, and exit without starting actors "
                             "(and without Ray, unless --inputs ray)")
    _add_inputs_flag(parser, "auto (ray for a run, driver for --dry-run)")
    parser.add_argument("--relabel-changed", action="store_true",
                        help="label again the committed image ids whose file changed (another URI, size or "
                             "modification time) instead of refusing the run")
    group = parser.add_argument_group("Ray Data resources")
    group.add_argument("--min-actors", type=int, default=defaults.min_actors, help="labeling actors kept at least")
    group.add_argument("--max-actors", type=_auto_int, default="auto",
                       help="labeling actors at most (autoscaling); auto: one per GPU of the cluster, or what fits its CPUs")
    group.add_argument("--gpus-per-actor", type=float, default=None,
                       help="GPUs per actor, fractions allowed; 0 labels on CPU; unset: 1 when the cluster has GPUs, else 0")
    group.add_argument("--cpus-per-actor", type=float, default=defaults.cpus_per_actor)
    group.add_argument("--decode-cpus", type=float, default=defaults.decode_cpus, help="CPUs per decode task")
    group.add_argument("--batch-size", type=_auto_int, default="auto",
                       help="images per actor call (one batched model call); auto: 16 on a GPU, 4 on a CPU")
    group.add_argument("--rows-per-file", type=int, default=defaults.rows_per_file, help="rows per Parquet file")
    _add_column_flags(parser)
    _add_output_flags(parser)
    _add_storage_flags(parser)

    def run(args) -> int:
        from irnet_ray.label import LabelJobError, LabelJobFailed, format_summary, label_images
        from irnet_ray.label.job import format_plan

        try:
            config = dataclasses.replace(
                defaults, max_side=args.max_side or None, min_actors=args.min_actors, max_actors=args.max_actors,
                gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, decode_cpus=args.decode_cpus,
                batch_size=args.batch_size, rows_per_file=args.rows_per_file, evaluate=not args.no_eval,
                max_error_rate=args.max_error_rate,
                cam_inference=dataclasses.replace(defaults.cam_inference, scales=_numbers("--scales", args.scales, float)),
                synthesis=dataclasses.replace(defaults.synthesis, steps=args.walk_steps),
            )  # fmt: skip
            summary = label_images(args.images, args.cam, args.irn, args.output, config, _storage_options(args),
                                   overwrite=args.overwrite, lease=_lease_config(args),
                                   allow_local_output_on_cluster=args.allow_local_output_on_cluster,
                                   dry_run=args.dry_run, relabel_changed=args.relabel_changed,
                                   manifest_columns=_manifest_columns(args), inputs=args.inputs,
                                   ray_address=args.ray_address, log=None if args.dry_run else _progress_line,
                                   verbose=args.verbose)  # fmt: skip
        except (LabelJobError, *_user_errors()) as error:
            return _fail("label", error)
        except LabelJobFailed as error:  # not a user mistake: status 1, committed work is kept
            print(f"irnet-ray label: {error}", file=sys.stderr)
            return 1
        return _finish("label", summary, args, [format_plan(summary) if args.dry_run else format_summary(summary)])

    parser.set_defaults(handler=run)


def _add_export_parser(commands) -> None:
    from irnet_ray.downstream.runs import DEFAULT_MIN_AREA, DEFAULT_SCORE_THRESHOLD

    parser = commands.add_parser(
        "export",
        help="export a finished labeling output as COCO instances JSON or VOC-style segmentation PNGs",
        description="Read the files OUTPUT/_manifest.json lists and write them for Mask R-CNN (coco) or "
                    "DeepLab (voc) trainers. See docs/downstream.md.",
    )
    formats = parser.add_subparsers(dest="format", metavar="FORMAT")
    formats.required = True
    coco = formats.add_parser("coco", help="one COCO instances JSON (RLE masks, boxes, scores)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    coco.add_argument("--output", required=True, help="the JSON file to write (local or s3://)")
    coco.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD,
                      help="drop instances scoring below this (0 marks tiny fragments)")
    coco.add_argument("--min-area", type=int, default=DEFAULT_MIN_AREA,
                      help="drop instances smaller than this (pixels)")
    voc = formats.add_parser("voc", help="SegmentationClass / SegmentationObject palette PNGs + ImageSets list",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    voc.add_argument("--output", required=True, help="the folder to write (local or s3://); a rerun resumes")
    voc.add_argument("--split", default="train", help="name of the list file ImageSets/Segmentation/SPLIT.txt")
    for sub in (coco, voc):
        sub.add_argument("--labels", required=True, help="the --output folder of a finished `irnet-ray label` run")
        sub.add_argument("--overwrite", action="store_true", help="replace what is at --output")
        _add_storage_flags(sub)

    def run(args) -> int:
        from irnet_ray.downstream.export import export_coco, export_voc

        try:
            if args.format == "coco":
                summary = export_coco(args.labels, args.output, score_threshold=args.score_threshold,
                                      min_area=args.min_area, options=_storage_options(args), overwrite=args.overwrite)
                line = (f"{summary['images']} image(s), {summary['annotations']} annotation(s) "
                        f"({summary['dropped']} instance(s) below --score-threshold or --min-area dropped), "
                        f"{summary['categories']} categories -> {summary['dest']}")
            else:
                summary = export_voc(args.labels, args.output, options=_storage_options(args),
                                     overwrite=args.overwrite, split=args.split)
                line = (f"{summary['images']} image(s): {summary['written']} written, {summary['skipped']} already "
                        f"there; list {summary['list']}")
        except _user_errors() as error:
            return _fail(f"export {args.format}", error)
        return _finish(f"export {args.format}", summary, args, [line])

    coco.set_defaults(handler=run)
    voc.set_defaults(handler=run)


# --------------------------------------------------------------------------------------
# pipeline: the four stages (and the exports) as one command, each stage through its own command

PIPELINE_STAGES = ("train-cam", "mine-relations", "train-irn", "label")


def _add_pipeline_parser(commands) -> None:
    parser = commands.add_parser(
        "pipeline",
        help="the whole method as one job: train-cam -> mine-relations -> train-irn -> label [-> export]",
        description=(
            "Run train-cam, mine-relations, train-irn and label (and optionally export coco / voc) one after "
            "the other, each as its own command with its own flags, on the Ray cluster the job runs in. Every "
            "stage resumes: rerunning the same command (or resubmitting the same job) continues where it "
            "stopped, and a finished stage returns at once. A failing stage ends the run with its name and a "
            "one-line reason. Stage settings go through --STAGE-args, e.g. --train-cam-args='--from-scratch "
            "--epochs 5' (use the = form when the value starts with a dash)."
        ),
    )
    parser.add_argument("--images", required=True,
                        help="image set: builtin[:key=value,...], manifest (.parquet/.csv/.jsonl), folder:ROOT, voc:ROOT[?split=train_aug]")
    parser.add_argument("--storage", required=True,
                        help="run storage of both trainings (local folder or s3://bucket/prefix): "
                             "STORAGE/CAM_RUN/model and STORAGE/IRN_RUN/model")
    parser.add_argument("--output", required=True, help="the labels: output folder or s3:// prefix of `label`")
    parser.add_argument("--ir-labels", default=None, help="output of mine-relations (default: STORAGE/ir-labels)")
    parser.add_argument("--cam-run-name", default="cam", help="run name of train-cam")
    parser.add_argument("--irn-run-name", default="irn", help="run name of train-irn")
    parser.add_argument("--export-coco", default=None,
                        help="also write the labels as one COCO instances JSON here (kept if it exists)")
    parser.add_argument("--export-voc", default=None,
                        help="also write the labels as VOC-style PNGs into this folder (resumes)")
    for stage in PIPELINE_STAGES:
        parser.add_argument(f"--{stage}-args", default="", metavar="FLAGS",
                            help=f"more flags of `irnet-ray {stage}` (see its --help), as one string")
    parser.add_argument("--export-args", default="", metavar="FLAGS", help="more flags of `irnet-ray export`")
    _add_column_flags(parser)
    group = parser.add_argument_group("storage and cluster (passed to every stage)")
    group.add_argument("--endpoint-url", default=None,
                       help="S3-compatible endpoint (e.g. http://minio:9000); credentials come from the AWS chain")
    group.add_argument("--region", default=None, help="S3 region (default: the AWS chain)")
    group.add_argument("--ray-address", default=None,
                       help="Ray cluster to join; local: a private one (default: the job's cluster under `ray job "
                            "submit`, else one `ray start` left running here, else a private one)")
    parser.set_defaults(handler=_run_pipeline)


def _pipeline_commands(args) -> list[tuple[str, list[str]]]:
    """(stage, argv of its `irnet-ray` command) of every stage, in order."""
    import shlex

    from irnet_ray.data.storage import join, normalize

    common = [flag for name in ("endpoint_url", "region", "ray_address") if getattr(args, name)
              for flag in (f"--{name.replace('_', '-')}", getattr(args, name))]  # fmt: skip
    columns = [flag for name, value in _manifest_columns(args).items()
               for flag in (f"--{name.replace('_', '-')}", value)]  # fmt: skip
    extra = {stage: shlex.split(getattr(args, stage.replace("-", "_") + "_args")) for stage in PIPELINE_STAGES}
    storage = normalize(args.storage)
    cam_model = join(storage, args.cam_run_name, "model")  # RunOptions.model_uri
    irn_model = join(storage, args.irn_run_name, "model")
    ir_labels = args.ir_labels or join(storage, "ir-labels")
    commands = [
        ("train-cam", ["--images", args.images, "--storage", storage, "--run-name", args.cam_run_name, *columns]),
        ("mine-relations", ["--images", args.images, "--cam", cam_model, "--output", ir_labels, *columns]),
        ("train-irn", ["--ir-labels", ir_labels, "--cam", cam_model, "--storage", storage,
                       "--run-name", args.irn_run_name]),
        ("label", ["--images", args.images, "--irn", irn_model, "--output", args.output, *columns]),
    ]  # fmt: skip
    commands = [(stage, [stage, *argv, *common, *extra[stage]]) for stage, argv in commands]
    export = shlex.split(args.export_args)
    for kind, dest in (("coco", args.export_coco), ("voc", args.export_voc)):
        if dest:
            commands.append((f"export {kind}", ["export", kind, "--labels", args.output, "--output", dest,
                                                *common, *export]))  # fmt: skip
    return commands


class _ReasonLine:
    """stderr that also keeps the last line a command wrote as ``irnet-ray COMMAND: reason``."""

    def __init__(self, stream, prefix: str) -> None:
        self.stream, self.prefix, self.reason = stream, prefix, ""

    def write(self, text: str) -> int:
        at = text.rfind(self.prefix)
        if at == 0 or (at > 0 and text[at - 1] == "\n"):  # a message may span lines: made one
            self.reason = " ".join(text[at + len(self.prefix):].split())[:500]
        return self.stream.write(text)

    def __getattr__(self, name: str):  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self.stream, name)


def _run_pipeline(args) -> int:
    import contextlib

    try:
        commands = _pipeline_commands(args)
        if args.export_coco:  # the COCO JSON is written atomically: when it is there, the export is done
            from irnet_ray.data.storage import exists

            if exists(args.export_coco, _storage_options(args)) and "--overwrite" not in args.export_args.split():
                print(f"[pipeline] export coco: {args.export_coco} exists (already exported; --export-args=--overwrite "
                      "writes it again)")  # fmt: skip
                commands = [(stage, argv) for stage, argv in commands if stage != "export coco"]
    except _user_errors() as error:
        return _fail("pipeline", error)
    parser = build_parser()
    for stage, argv in commands:  # every stage's flags are checked before the first one runs
        try:
            parser.parse_args(argv)
        except SystemExit as exit:  # argparse printed the stage's usage and its error line
            print(f"irnet-ray pipeline: stage {stage}: bad flags (see above)", file=sys.stderr)
            return int(exit.code or 2)
    import time

    seconds = {}
    for number, (stage, argv) in enumerate(commands, 1):
        print(f"[pipeline] {number}/{len(commands)} {stage}", flush=True)
        started = time.perf_counter()
        stderr = _ReasonLine(sys.stderr, f"irnet-ray {stage}: ")
        try:
            with contextlib.redirect_stderr(stderr):
                status = main(argv)
        except Exception as error:  # not a user mistake: the traceback follows
            print(f"irnet-ray pipeline: stage {stage} failed: {type(error).__name__}: "
                  f"{' '.join(str(error).split())[:500]}", file=sys.stderr)  # fmt: skip
            raise
        if status:
            hint = "; resubmitting the same job resumes (finished stages return at once)" if status == 1 else ""
            print(f"irnet-ray pipeline: stage {stage} failed (exit status {status}): {stderr.reason or 'see above'}"
                  f"{hint}", file=sys.stderr)  # fmt: skip
            return status
        seconds[stage] = time.perf_counter() - started
    times = ", ".join(f"{stage} {t:.0f} s" for stage, t in seconds.items())
    print(f"[pipeline] done: labels in {args.output} ({times})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irnet-ray",
        description="Pixel-accurate pseudo masks from image-level labels (IRNet, CVPR 2019).",
    )
    from irnet_ray import __version__

    parser.add_argument("--version", action="version", version=f"irnet-ray {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_demo_parser(commands)
    _add_benchmark_parser(commands)
    _add_train_cam_parser(commands)
    _add_mine_relations_parser(commands)
    _add_train_irn_parser(commands)
    _add_train_deeplab_parser(commands)
    _add_train_maskrcnn_parser(commands)
    _add_label_parser(commands)
    _add_visualize_parser(commands)
    _add_export_parser(commands)
    _add_pipeline_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
