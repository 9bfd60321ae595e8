"""`guidedrl` command line: train | recipes | eval | compare | report | demo | base.

User mistakes (config, data, model path, reward function) print one clear message and exit 2.
A run stopped by SIGINT / SIGTERM exits 130 / 143 (128 + the signal), after its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from guidedrl.core.errors import UserError

EPILOG = "Docs: README.md. Every command takes --help."


def _offline_defaults() -> None:
    # Tests and the default demo never touch the network; real Hub ids still work when online
    # because users can unset these.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_train(a: argparse.Namespace) -> int:
    from guidedrl.core import dist
    from guidedrl.core.config import dump_config, load_config
    from guidedrl.core.console import console
    from guidedrl.trainer.loop import default_run_dir, run

    if a.resume:
        run_dir = Path(a.resume)
        if not (run_dir / "config.yaml").exists():
            raise UserError(f"--resume {run_dir}: no config.yaml there (not a run folder)")
        cfg = load_config(str(run_dir / "config.yaml"), a.set)
        _check_resume_args(a, run_dir, cfg.name)
    else:
        cfg = load_config(a.recipe, a.set)
        run_dir = Path(a.out) if a.out else default_run_dir(cfg)
    dist.init_from_env()  # under torchrun: join the group now, so that process 0 alone prints
    main = dist.is_main()
    if main:
        console.rule(f"guidedrl train: {cfg.name}")
        console.print(dump_config(cfg), markup=False, highlight=False)
    out = run(cfg, run_dir, resume=bool(a.resume))
    dist.shutdown()  # under torchrun: wait for every process, then leave the group
    if main:
        console.print(f"run folder: {out}")
    return 0


def _check_resume_args(a: argparse.Namespace, run_dir: Path, name: str) -> None:
    """A recipe or --out given with --resume must be the run's own (a resume never changes them)."""
    from guidedrl.core.config import load_config

    if a.out is not None and Path(a.out).resolve() != run_dir.resolve():
        raise UserError(f"--out {a.out} with --resume {run_dir}: a resumed run continues in its own folder; "
                        "leave out --out")
    if a.recipe is not None and load_config(a.recipe).name != name:
        raise UserError(f"--resume {run_dir} continues a `{name}` run, not `{a.recipe}`; leave out the recipe "
                        "(its config is the run's config.yaml, changed only by --set)")


def cmd_recipes(a: argparse.Namespace) -> int:
    from guidedrl.core.config import RECIPES_DIR, load_yaml

    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        desc = load_yaml(p).get("description", "")
        print(f"{p.stem:<18} {desc}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from guidedrl.app.eval_cmd import evaluate_cli

    return evaluate_cli(a)


def cmd_compare(a: argparse.Namespace) -> int:
    from guidedrl.app.compare import compare

    seeds = list(range(a.seeds)) if a.seeds else [0]
    compare(a.recipes, overrides=a.set, steps=a.steps, seeds=seeds, out=Path(a.out))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from guidedrl.app.compare import report

    out = report([Path(p) for p in a.runs], Path(a.out) if a.out else None)
    print(f"report: {out}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from guidedrl.app.demo import demo

    return demo(quick=a.quick, out=Path(a.out), steps=a.steps)


def cmd_base(a: argparse.Namespace) -> int:
    import json

    from guidedrl.nn.base import base_info, build_base

    if a.action == "build":
        build_base(a.name, force=a.force)
    print(json.dumps(base_info(a.name), indent=1, default=str))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guidedrl", description="RL fine-tuning of language models with first-class guidance.", epilog=EPILOG)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    t = sub.add_parser("train", help="train a recipe", description="Train a recipe (a name from `guidedrl recipes` or a YAML path). With no recipe: GRPO on the embedded arith task.")
    t.add_argument("recipe", nargs="?", default=None, help="recipe name or YAML file (default: built-in defaults = grpo on arith)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set train.lr=1e-6 (repeatable)")
    t.add_argument("--out", help="run folder (default: run.dir/run.name)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("recipes", help="list recipes", description="List the built-in recipes with a one-line description each.")
    r.set_defaults(fn=cmd_recipes)

    e = sub.add_parser("eval", help="evaluate a model", description="pass@k / mean@k / majority@k per difficulty level, optionally with test-time guidance.")
    e.add_argument("--model", required=True, help="run folder, checkpoint folder, model folder, Hub id or builtin:arith")
    e.add_argument("--task", default=None, help="built-in task (arith, reasoning_gym:NAME) or a data file (default: the run's eval set, else arith)")
    e.add_argument("--k", default="1,8", help="comma-separated k values (default 1,8)")
    e.add_argument("--n", type=int, default=None, help="samples per problem (default max k)")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N problems")
    e.add_argument("--guidance", default="none", help="none | hint | prefix:FRACTION (test-time guidance)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (e.g. data.eval.task_args.levels=[5])")
    e.add_argument("--out", default=None, help="folder for eval.json / eval.md")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("compare", help="run recipes head to head", description="Run every recipe on the same task, base model and budget; write a table, plots and an HTML report. Finished runs are not redone.")
    c.add_argument("recipes", nargs="+", help="recipe names or YAML files")
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--seeds", type=int, default=1, help="number of seeds (0..S-1)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override applied to every recipe")
    c.add_argument("--out", default="runs/compare")
    c.set_defaults(fn=cmd_compare)

    rp = sub.add_parser("report", help="plots + HTML report from run folders", description="Regenerate plots and the HTML report from metrics.jsonl files.")
    rp.add_argument("runs", nargs="+", help="run folders")
    rp.add_argument("--out", default=None, help="output folder (default: the run folder, or ./report for several)")
    rp.set_defaults(fn=cmd_report)

    d = sub.add_parser("demo", help="the embedded demo (offline, CPU)", description="Build or load the tiny arith base model, run GRPO and a guided recipe on mixed-difficulty problems, evaluate before/after and write a report.")
    d.add_argument("--quick", action="store_true", help="a version of under a minute (6 steps, small eval)")
    d.add_argument("--steps", type=int, default=None, help="override the number of steps")
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("base", help="build / inspect the embedded base model", description="The tiny arith base model guidedrl builds itself and caches.")
    b.add_argument("action", choices=["build", "info"])
    b.add_argument("--name", default="arith", help="arith (the policy base) or arith-teacher (SFT on every level; the teacher of ampo / rlgf_*)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.set_defaults(fn=cmd_base)
    return p


def main(argv: list[str] | None = None) -> int:
    _offline_defaults()
    p = parser()
    a = p.parse_args(argv)
    if not getattr(a, "fn", None):
        p.print_help()
        return 0
    try:
        return a.fn(a)
    except UserError as e:
        _print_line("[bold red]error:[/]", str(e))
        return e.exit_code
    except KeyboardInterrupt as e:  # a signal (guidedrl.trainer.rundir.Interrupted), or Ctrl-C anywhere else
        try:
            _print_line("[yellow]interrupted:[/]", str(e) or "stopped by Ctrl-C")
        except KeyboardInterrupt:  # yet another Ctrl-C while printing: go
            pass
        return getattr(e, "exit_code", 130)


def _print_line(label: str, message: str) -> None:
    """`label message` on stderr, never wrapped at the terminal's width (a line per line of the message)."""
    from rich.markup import escape  # (here, not at the top: `guidedrl --help` starts without rich)

    from guidedrl.core.console import console

    console.print(f"{label} {escape(message)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
