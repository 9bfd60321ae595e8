"""Build one base-model variant and measure its properties (the sweep behind docs/results.md).

    python bench/base_sweep.py '{"steps": 400}' '{"QUERY_NAME": null}' --levels 7,6

argv[1]: BaseRecipe overrides (JSON); argv[2]: arith module settings to change (JSON, e.g.
TAIL, MAX_VALUE, QUERY_NAME). Each variant is built into its own cache folder under
$GUIDEDRL_CACHE (default ~/.cache/guidedrl); then, for each hardest level L in --levels, pass@1 /
pass@8 per level and the hardest level's half-prefix and hint pass@k are printed.
"""

from __future__ import annotations

import argparse
import json

from guidedrl.nn import base
from guidedrl.data.tasks import arith


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="BaseRecipe overrides as JSON")
    p.add_argument("task", nargs="?", default="{}", help="arith settings as JSON")
    p.add_argument("--levels", default="7", help="hardest levels to measure, comma-separated")
    p.add_argument("--problems", type=int, default=48, help="test problems per level")
    a = p.parse_args()
    for key, value in json.loads(a.task).items():
        if not hasattr(arith, key):
            raise SystemExit(f"arith has no setting {key}")
        setattr(arith, key, value)
    overrides = {**json.loads(a.recipe), "measure_problems": 0}
    path = base.build_base(overrides=overrides, progress=False)
    info = json.loads((path / base.INFO_FILE).read_text())
    print(f"{a.recipe} {a.task} params={info['params']} train_s={info['train_seconds']} loss={info['final_loss']:.3f}")
    for hardest in (int(x) for x in a.levels.split(",")):
        arith.LEVELS = hardest
        props = base.measure_properties(path, n_per_level=a.problems, samples=8)
        print("  " + " ".join(f"L{lv}={v['pass@1']:.3f}/{v['pass@8']:.2f}" for lv, v in props["levels"].items()))
        half, hint = props["half_prefix"], props["hint"]
        print(f"  hardest={hardest} half-prefix pass@1={half['pass@1']:.3f} pass@8={half['pass@8']:.3f} "
              f"hint pass@1={hint['pass@1']:.3f} pass@8={hint['pass@8']:.3f}", flush=True)


if __name__ == "__main__":
    main()
