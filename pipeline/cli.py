"""`hicom`: build, rebuild, stats and export HICom-style datasets. Options live in YAML configs."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from schemas.overrides import parse_set_options

log = logging.getLogger("hicom")
EXIT_INCOMPLETE = 3  # the run stopped cleanly but left work for a rerun


def _setup_logging(run_dir: Path | None, verbose: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "logs" / "hicom.log", encoding="utf-8"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def _print_build(report, dry_run: bool) -> None:
    if dry_run:
        print(f"dry run: {len(report.pending)} videos would be processed, {report.skipped_committed} already "
              f"committed, {report.inputs_failed_at_ingest} inputs fail at ingest")
        for relpath in report.pending:
            print(f"  {relpath}")
        return
    c = report.counts
    print(f"built {report.run_dir}: {report.processed_videos} videos processed ({report.skipped_committed} "
          f"already committed) in {report.seconds:.1f}s; run totals: {c['clips']} clips, {c['pairs']} pairs, "
          f"{c['failures']} failures in {c['shards']} shards")
    print(f"shards: {report.run_dir}/shards")
    from stages.llm import summary_line

    for stage, usage in sorted(report.llm_usage.items()):
        print(summary_line(stage, usage))


def _check_input_kind(args, cfg) -> None:
    """A config that pins `input.kind` must agree with what `--input` is; say which option to change."""
    from stages.ingest import detect_kind

    given = getattr(args, "input", None)
    if not given or cfg.input.kind == "auto" or not Path(given).exists():
        return
    found = detect_kind(Path(given))
    if found != cfg.input.kind:
        suggestion = "configs/folder.yaml" if found == "directory" else "a config for that input"
        raise ValueError(f"{args.config or 'the config'} sets input.kind: {cfg.input.kind}, but --input {given} is "
                         f"a {found}: use {suggestion} or add --set input.kind=auto")


_START_FILES = {"config.yaml", "manifest.json", "logs"}  # all a run holds before its first result


def _remove_if_empty_run(run_dir: Path, created: Path) -> None:
    """A build that failed at start leaves no run directory behind (nor its logs/): `created` is the topmost
    folder this command made for it. Anything a run produced (shards, failures, the LLM response cache)
    keeps the directory, so a rerun resumes from it."""
    if not run_dir.is_dir():
        return
    produced = (p for p in run_dir.rglob("*") if p.is_file() and p.relative_to(run_dir).parts[0] not in _START_FILES)
    if next(produced, None) is not None:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(run_dir.resolve()):
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(created, ignore_errors=True)


def _build_with(args, overrides: dict, out: str | None) -> int:
    """Shared by build and rebuild: config + --set + --address, then a (resumable) build."""
    from pipeline.build import build
    from pipeline.captioning import CaptioningStopped
    from schemas.config import load_run_config
    from stages.ray_runtime import ray_output_to

    overrides = {**parse_set_options(args.set), **overrides}
    if args.address:
        overrides["ray.address"] = args.address
    cfg = load_run_config(args.config, overrides)
    _check_input_kind(args, cfg)
    from stages.storage import Storage

    run_dir = out or str(Path("runs") / cfg.name)  # a path or an object-store URI: never through Path()
    local_dir = Storage.from_uri(run_dir).local_path()  # None on an object store: no local log file
    created = (next((p for p in reversed([local_dir, *local_dir.parents]) if not p.exists()), None)
               if local_dir is not None else None)
    _setup_logging(None if args.dry_run else local_dir, args.verbose)
    log_file = local_dir / "logs" / "hicom.log" if local_dir is not None and not args.dry_run else None
    try:
        with ray_output_to(log_file):  # Ray's lines to the run's log, not between the progress lines
            report = build(cfg, run_dir, dry_run=args.dry_run, progress=not args.no_progress)
    except Exception as exc:
        # A start error leaves nothing behind; a run stopped by its endpoint keeps its log and manifest.
        if created is not None and not isinstance(exc, CaptioningStopped):
            _remove_if_empty_run(local_dir, created)
        raise
    _print_build(report, args.dry_run)
    if report.deferred:
        from pipeline.captioning import deferred_message

        log.warning("%s", deferred_message(len(report.deferred), report.llm_usage))
        return EXIT_INCOMPLETE
    return 0


def cmd_build(args) -> int:
    return _build_with(args, {"input.path": args.input} if args.input else {}, args.out)


def cmd_rebuild(args) -> int:
    return _build_with(args, {"input.path": args.annotations, "input.kind": "llava",
                              "input.data_root": args.video_root, "split.mode": "given"}, args.out)


def cmd_stats(args) -> int:
    import duckdb

    from pipeline.stats import connect, plot, report, run_sql

    con = connect(args.run_dir, args.annotations)
    try:
        print(run_sql(con, args.sql) if args.sql else report(con))
        if not args.sql and (args.compare or _has_recipe(args.run_dir)):
            from pipeline.recipe_stats import recipe_report

            print("\n" + recipe_report(con, args.compare))
    except duckdb.Error as exc:
        log.error("query refused or failed: %s", exc)
        return 2
    if args.plot:
        for path in plot(con, args.plot):
            print(f"plot: {path}")
    return 0


def _has_recipe(run_dir: str) -> bool:
    import yaml

    from stages.storage import Storage

    run = Storage.from_uri(run_dir)
    return run.exists("config.yaml") and bool((yaml.safe_load(run.read_text("config.yaml")) or {}).get("recipe"))


def cmd_export(args) -> int:
    from pipeline.export import export_llava

    counts = export_llava(args.run_dir, args.out_json, args.clip_root, progress=not args.no_progress)
    print(json.dumps(counts))
    if counts["samples"] == 0:
        log.warning("%s has no instruction/answer pairs, so %s is an empty list: build with a manifest that has "
                    "captions, a `captioning:` config (configs/demo.yaml), or run `hicom caption`",
                    args.run_dir, args.out_json)
    return 0


def cmd_compact(args) -> int:
    from pipeline.compact import compact, run_shard_config

    cfg = run_shard_config(args.run_dir)
    done = compact(args.run_dir, cfg.model_copy(update={"max_samples": args.max_samples or cfg.max_samples}))
    print(json.dumps({"shards": [m.shard for m in done], "parts_replaced": sum(len(m.replaces) for m in done)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hicom", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def run_options(p):
        p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config field, e.g. --set split.mode=fixed (repeatable)")
        p.add_argument("--dry-run", action="store_true", help="list what would be processed and stop")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("build", help="raw videos -> clips + frames -> WebDataset shards")
    p.add_argument("config", nargs="?", help="run config YAML (configs/*.yaml); defaults apply without one")
    p.add_argument("--input", help="directory, manifest (csv/parquet/jsonl) or LLaVA json (overrides input.path)")
    p.add_argument("--out", help="run directory (default runs/<config name>); rerun to resume")
    run_options(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("rebuild", help="HICom-248K from its release JSON and clip folder")
    p.add_argument("--annotations", required=True, help="LLaVA-format JSON/JSONL (e.g. 248328_qa_llavaformat.json)")
    p.add_argument("--video-root", required=True, help="folder the annotation `video` paths are relative to")
    p.add_argument("--out", required=True, help="run directory; rerun to resume")
    p.add_argument("--config", help="run config YAML for clip/shard options")
    run_options(p)
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("stats", help="DuckDB report over a run's indexes (tables clips, pairs, videos, "
                                     "failures, shards)")
    p.add_argument("run_dir")
    p.add_argument("--sql", help="run this SQL instead of the report (read-only)")
    p.add_argument("--plot", metavar="OUT_DIR", help="write PNG histograms here")
    p.add_argument("--annotations", metavar="VERSION",
                   help="take `pairs` (and their failures) from an annotation version made by `hicom caption`")
    p.add_argument("--compare", metavar="LLAVA_JSON",
                   help="recipe figures of a LLaVA-format file (e.g. 248328_qa_llavaformat.json) beside the run's")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("export-llava", help="the release training JSON + clip mp4s from shards")
    p.add_argument("run_dir")
    p.add_argument("out_json")
    p.add_argument("--clip-root", help="where clip mp4s go (default: <out_json stem>_clips/ beside it)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compact", help="merge a run's small committed parts into full-size shards")
    p.add_argument("run_dir")
    p.add_argument("--max-samples", type=int, help="clips per shard (default: the run's shard.max_samples)")
    p.set_defaults(func=cmd_compact)

    from pipeline.caption_command import add_caption_cli
    from pipeline.train_cli import add_train_cli

    add_caption_cli(sub)
    add_train_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        _setup_logging(None, getattr(args, "verbose", False))
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
