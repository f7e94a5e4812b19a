"""Cold start of the command line: one `search text` in a fresh process, start to exit.

For each source tree (this checkout, and with ``--baseline DIR`` another checkout of the engine,
such as an earlier commit in a git worktree), in one run:

- an index of the demo model (``checkpoints/demo``, made by ``make demo``) over 64 of the shipped
  images, and an index of a real-size random-init BERT-base + ViT-B/16 checkpoint (1.6 GB with
  its optimizer state) over 32 captions, each built by that tree's own ``index build``;
- ``search text`` against each, ``--runs`` times in new processes (the operating system's file
  cache warm, as for a user's second search), median and range of the wall time;
- as the floor, the time to start Python, import torch and transformers' BERT and exit.

    python benchmarks/bench_coldstart.py [--runs 5] [--baseline DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import make_captions, make_model_dir

ROOT = Path(__file__).resolve().parents[1]
DEMO = (ROOT / "checkpoints/demo/checkpoint.pt", ROOT / "models/demo-minilm", ROOT / "data/demo-vit")
# The console scripts as files of the chosen source tree (``{source}`` is filled in).
SCRIPT = "import runpy, sys; sys.argv[0] = '{name}'; runpy.run_path('{{source}}/{file}', run_name='__main__')"
SEARCH = SCRIPT.format(name="search", file="search.py")
INDEX = SCRIPT.format(name="index", file="index_builder.py")
FLOOR = "import os, torch; from transformers import BertModel; os._exit(0)"


def run(code: str, args: list[str], source: Path) -> float:
    env = os.environ | {"PYTHONPATH": str(source), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    # Run from the source tree's parent: `python -c` puts the working folder first on the path,
    # and the engine's own folder there would shadow ``source``.
    result = subprocess.run(
        [sys.executable, "-c", code.format(source=source), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=source.parent,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed in {source}: {result.stderr.strip()}")
    return seconds


def timed(code: str, args: list[str], source: Path, runs: int) -> dict[str, float]:
    run(code, args, source)  # the file cache warm, as for any second search
    times = [run(code, args, source) for _ in range(runs)]
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def model_flags(checkpoint: Path, text: Path, vision: Path) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--text-model", str(text), "--vision-model", str(vision)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout of the engine to compare with")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sources = {"this checkout": ROOT}
    if args.baseline is not None:
        sources = {"baseline": args.baseline.resolve(), **sources}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rng = np.random.default_rng(0)
        (work / "model").mkdir()
        spec = make_model_dir(work / "model", rng)
        captions = work / "captions.txt"
        captions.write_text("\n".join(make_captions(32, rng)) + "\n")
        images = work / "images"
        picked = sorted((ROOT / "data/images").rglob("*.png"))[::24][:64]
        for path in picked:
            target = images / path.relative_to(ROOT / "data/images")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        real_size = model_flags(spec.checkpoint, spec.text_model, spec.vision_model)
        cases = {
            "real-size BERT-base + ViT-B/16": (
                ["--captions", str(captions), *real_size],
                ["--target", "captions"],
            ),
        }
        if DEMO[0].is_file():
            cases["demo model"] = ([str(images), *model_flags(*DEMO)], [])
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name, source in sources.items():
            for case, (build_args, search_args) in cases.items():
                out = work / f"index-{len(results)}-{case.split()[0]}"
                run(INDEX, ["build", *build_args, "--out", str(out), "--device", "cpu"], source)
                query = ["text", "a red car", "--index", str(out), "-k", "5", "--device", "cpu", *search_args]
                results.setdefault(case, {})[name] = timed(SEARCH, query, source, args.runs)
        floor = timed(FLOOR, [], ROOT, args.runs)

    report = {
        "runs": args.runs,
        "torch": torch.__version__,
        "floor_import_torch_and_bert_s": round(floor["median"], 3),
        "search_text_s": {
            case: {name: {k: round(v, 3) for k, v in t.items()} for name, t in per.items()}
            for case, per in results.items()
        },
    }
    if args.baseline is not None:
        report["after_over_before"] = {
            case: round(per["this checkout"]["median"] / per["baseline"]["median"], 3)
            for case, per in results.items()
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"cold `search text`, median of {args.runs} new processes (min-max), seconds")
    for case, per in results.items():
        for name, t in per.items():
            print(f"  {case:<32} {name:<14} {t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})")
        if args.baseline is not None:
            print(f"  {case:<32} this / baseline {report['after_over_before'][case]:.2f}")
    print(f"  floor: python + import torch + transformers' BertModel: {floor['median']:.2f}")


if __name__ == "__main__":
    main()
