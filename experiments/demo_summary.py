"""The figures of a finished ``make demo``, gathered from the files its stages wrote, so that
docs/demo.md can quote them from one committed file (``experiments/quoted.py`` checks them).

    python experiments/demo_summary.py                 # outputs/demo/summary.json
    python experiments/demo_summary.py --publish true  # experiments/reports/published/demo/

Each figure is read from its stage's own record (manifests, ``run.fit.json``, ``scores.json``);
a stage that has not run is an error naming the file, not a figure left out. The summary carries
the git states the stages recorded, the library hash of the checkout the demo ran in (``--repo``,
default the one this script is in) and the dates of the files it read.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from biomedvital.data.jsonio import write_json  # noqa: E402
from biomedvital.tracking.provenance import git_state, library_hash  # noqa: E402

STAGES = {
    "generate": "generate/manifest.json",
    "rate": "rate/manifest.json",
    "selector": "selector/run.fit.json",
    "select": "selected/manifest.json",
    "tuner": "tuner/export/run.json",
    "test": "eval/demo_vqa/scores.json",
    "answer": "eval/demo_vqa_answer/scores.json",
    "judge": "judge/manifest.json",
}
VQA = ("open_recall", "closed_acc", "answered", "n_hit_max_new_tokens")


def _read(demo: Path, stage: str) -> dict:
    path = demo / STAGES[stage]
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run `make demo` first ({stage} has not finished)")
    return json.loads(path.read_text(encoding="utf-8"))


def _pick(record: dict, keys: tuple[str, ...]) -> dict:
    return {k: record[k] for k in keys if k in record}


def _selector(record: dict) -> dict:
    """The held-out metrics of the fit's final checkpoint and its pair counts."""
    metrics = record["metrics"]
    wanted = ("val/align_rate", "val/pair_acc", "val/auroc", "val/mean_rank")
    out = {k: metrics[k] for k in wanted if k in metrics}
    out["pairs"] = record["data"]["pairs"]
    return out


def summarise(demo: Path) -> dict:
    """One figure group per stage, from the files the stages wrote."""
    gen = _read(demo, "generate")["counts"]
    rate = _read(demo, "rate")["counts"]
    sel = _read(demo, "select")
    judge = _read(demo, "judge")
    return {
        "generate": _pick(gen, ("figures", "done", "written", "rejected", "rejected_by_reason")),
        "rate": _pick(rate, ("candidates", "rated", "failed", "reasked")),
        "selector": _selector(_read(demo, "selector")),
        "select": _pick(sel, ("kept", "dropped", "unscored_candidates", "top_percent")),
        "test": _pick(_read(demo, "test"), VQA),
        "answer": _pick(_read(demo, "answer"), VQA),
        "judge": judge.get("counts", {}),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, default=None, help="default: REPO/outputs/demo")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout the demo ran in")
    ap.add_argument("--publish", choices=("true", "false"), default="false")
    args = ap.parse_args(argv)
    args.demo = args.demo or args.repo / "outputs" / "demo"
    summary = summarise(args.demo)
    files = [args.demo / rel for rel in STAGES.values()]
    recorded = [json.loads(f.read_text(encoding="utf-8")).get("git") for f in files]
    made = {
        "made": datetime.now(UTC).isoformat(timespec="seconds"),
        "made_at": {
            **git_state(args.repo),
            "library_hash": library_hash(args.repo / "biomedvital"),
        },
        "runs_git": sorted({f"{g['git_sha']} dirty={g['git_dirty']}" for g in recorded if g}),
        "files_from": min(datetime.fromtimestamp(f.stat().st_mtime, UTC) for f in files),
        "files_to": max(datetime.fromtimestamp(f.stat().st_mtime, UTC) for f in files),
    }
    made["files_from"] = made["files_from"].isoformat(timespec="seconds")
    made["files_to"] = made["files_to"].isoformat(timespec="seconds")
    out = (
        REPO / "experiments" / "reports" / "published" / "demo" / "summary.json"
        if args.publish == "true"
        else args.demo / "summary.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {**made, **summary})
    print(json.dumps(summary, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
