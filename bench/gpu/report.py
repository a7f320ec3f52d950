"""The GPU check's report: one table on stdout, gpu_report.md with every figure.

    python bench/gpu/report.py --results R.jsonl [--junit T.xml] --out gpu_report.md
    python bench/gpu/report.py --sample DIR     # the dry run: made-up rows through the same writer

The headline table answers the questions the check exists for (detector
images/s against the 100 images/s target, trainer MFU against 45%, what fits,
whether decoding or the data loader holds the GPU back); below it, every
section's rows as measured, the parts' exit status and time, and each
gpu-marked test's outcome. A part stopped at its time cap shows what it had.
"""
from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
from figures import Results, read_results  # noqa: E402

DETECTOR_TARGET = 100.0  # images/s of X152-C4 at 600x1000 on an H100; its FLOP limit is about 500
MFU_TARGET = 0.45
SECTIONS = (  # report order; anything else follows
    ("status", "Parts: exit status and time (each under its own cap)"),
    ("device", "Device and software"),
    ("detector_setup", "Detector: set-up"), ("detector", "Detector X152-C4, 600x1000: images/s and peak memory"),
    ("detector_stages", "Detector: where the time goes (CUDA events per stage)"),
    ("detector_kernels", "Detector: top CUDA kernels (torch profiler)"),
    ("detector_bf16_vs_fp32", "Detector: bf16 autocast against fp32"),
    ("gallery_setup", "Gallery job: set-up"), ("gallery", "Gallery job in-process and what feeds it"),
    ("gallery_verdict", "Gallery job: is decoding the bottleneck?"),
    ("matmul", "bf16 matrix products"), ("trainer_model", "Trainer: model"),
    ("trainer", "Trainer steps (bf16 autocast, fused AdamW): samples/s, MFU, peak memory"),
    ("loader_setup", "Data loader: set-up"), ("loader", "Data loader: VALP samples/s by worker count"),
    ("loop", "The training loop: share of each step waiting for data"),
)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v).replace("|", "/")


def md_table(rows: list[dict[str, Any]], drop: tuple[str, ...] = ("section",)) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in drop and k not in cols]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def read_junit(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                msg = (el.get("message") or "").splitlines()
                outcome += f": {msg[0][:100]}" if msg else ""
                break
        rows.append({"test": case.get("name"), "outcome": outcome, "seconds": round(float(case.get("time", 0)), 1)})
    return rows


def _pick(rows: list[dict[str, Any]], section: str, **match: Any) -> dict[str, Any] | None:
    found = [r for r in rows if r["section"] == section and all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def headline(rows: list[dict[str, Any]], tests: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(figure, value, target or reading) rows; 'not measured' where a part left no row."""
    nm = "not measured"
    out: list[tuple[str, str, str]] = []
    if tests:
        passed = sum(t["outcome"] == "passed" for t in tests)
        bad = [t["test"] for t in tests if t["outcome"].startswith(("FAILED", "ERROR"))]
        skipped = sum(t["outcome"].startswith("skipped") for t in tests)
        out.append(("gpu-marked tests", f"{passed} passed, {len(bad)} failed, {skipped} skipped",
                     "all pass" + (f"; failed: {', '.join(bad)}" if bad else "")))
    else:
        out.append(("gpu-marked tests", nm, "all pass"))
    det = [r for r in rows if r["section"] == "detector"]
    big = max((r["batch"] for r in det), default=8)
    for p in ("fp32", "tf32", "bf16"):
        r = _pick(rows, "detector", precision=p, batch=big)
        err = _pick(rows, "detector", precision=p, error=next((x["error"] for x in det if x.get("precision") == p
                                                               and "error" in x), None))
        value = _fmt(r.get("images_per_s")) if r and "error" not in r else nm
        if err is not None and "error" in err:
            value += f" (error: {err['error'][:80]})"
        out.append((f"detector {p}, batch {big}: images/s", value, f">= {DETECTOR_TARGET:.0f} on an H100"
                    + (f"; peak {_fmt(r.get('peak_gib'))} GiB" if r and "error" not in r else "")))
    r = _pick(rows, "detector_bf16_vs_fp32")
    out.append(("detector bf16 vs fp32: boxes found again / feature cosine",
                f"{_fmt(r['boxes_found_again'])} / {_fmt(r['feature_cosine'])}" if r else nm,
                "same concept, IoU >= 0.9"))
    stages = [r for r in rows if r["section"] == "detector_stages"]
    if stages:
        p = stages[0]["precision"]
        top = max((r for r in stages if r["precision"] == p), key=lambda r: r["share"])
        out.append((f"detector {p}: largest stage", f"{top['stage']} {top['share']:.0%}", "CUDA events"))
    job = _pick(rows, "gallery_verdict")
    g = next((r for r in rows if r["section"] == "gallery" and str(r.get("what", "")).startswith("gallery job")), None)
    out.append(("gallery job in-process: images/s", _fmt(g["images_per_s"]) if g else nm,
                (f"{_fmt(job['job_vs_detector'])}x the detector alone; decode-bound: {_fmt(job['decode_bound'])}; "
                 f"{job['decode_processes_to_feed_detector']} decode processes feed it") if job else ""))
    trainer = [r for r in rows if r["section"] == "trainer"]
    for task in ("valp", "tavp"):
        for compiled in (False, True):
            cands = [r for r in trainer if r["task"] == task and r.get("compiled") == compiled and r.get("fits")]
            r = max(cands, key=lambda r: r.get("mfu") or r.get("samples_per_s") or 0, default=None)
            name = f"trainer {task} seq {80 if task == 'valp' else 100}{' compiled' if compiled else ''}: MFU"
            val = (f"{_fmt(r.get('mfu'))} at micro-batch {r['micro_batch']} ({_fmt(r.get('samples_per_s'))} "
                   "samples/s)" if r else nm)
            errors = [x["error"] for x in trainer if x["task"] == task and x.get("compiled") == compiled
                      and "error" in x]
            if errors:
                val += f" (error: {errors[0][:80]})"
            out.append((name, val, f">= {MFU_TARGET:.0%} of the datasheet bf16 peak"))
        fits = [r for r in trainer if r["task"] == task and not r.get("compiled")]
        if fits:
            ok = [r for r in fits if r.get("fits")]
            largest = max(ok, key=lambda r: r["micro_batch"]) if ok else None
            oom = sorted(r["micro_batch"] for r in fits if r.get("fits") is False)
            out.append((f"trainer {task}: largest micro-batch tried that fits",
                        f"{largest['micro_batch']} ({_fmt(largest['peak_gib'])} GiB)" if largest else "none",
                        f"out of memory at {oom}" if oom else "all tried sizes fit"))
    loaders = [r for r in rows if r["section"] == "loader"]
    if loaders:
        best = max(loaders, key=lambda r: r["valp_samples_per_s"])
        out.append(("data loader: VALP samples/s (best worker count)",
                    f"{_fmt(best['valp_samples_per_s'])} with {best['workers']} workers",
                    f"keeps up with the step: {_fmt(best.get('keeps_up_with_step'))}"))
    else:
        out.append(("data loader: VALP samples/s", nm, ""))
    r = _pick(rows, "loop")
    out.append(("training loop: share of a step waiting for data", _fmt(r["data_wait_share"]) if r else nm,
                f"{r['workers_per_task']} workers per task" if r else ""))
    return out


def render(rows: list[dict[str, Any]], tests: list[dict[str, Any]]) -> tuple[str, str]:
    """(the plain table for stdout, the markdown report)."""
    head = headline(rows, tests)
    dev = next((r for r in rows if r["section"] == "device"), {})
    card = dev.get("device", "unknown device")
    w = max(len(h[0]) for h in head)
    v = max(len(h[1]) for h in head)
    plain = [f"GPU check on {card} ({dev.get('date', '?')}, torch {dev.get('torch', '?')})"]
    plain += [f"{a:<{w}}  {b:<{v}}  {c}" for a, b, c in head]
    md = [f"# GPU check: {card}", "",
          f"Measured {dev.get('date', '?')} with torch {dev.get('torch', '?')} (CUDA {dev.get('cuda', '-')}), "
          "by `bench/gpu_check.sh`. Random detector and BERT weights: speeds, not quality.", "",
          "| figure | value | target / reading |", "|---|---|---|"]
    md += [f"| {a} | {b} | {c} |" for a, b, c in head]
    known = [s for s, _ in SECTIONS]
    titles = dict(SECTIONS)
    order = known + sorted({r["section"] for r in rows} - set(known))
    for s in order:
        sec = [r for r in rows if r["section"] == s]
        if sec:
            md += ["", f"## {titles.get(s, s)}", ""] + md_table(sec)
    if tests:
        md += ["", "## gpu-marked tests", ""] + md_table(tests, drop=())
    return "\n".join(plain), "\n".join(md) + "\n"


def sample(folder: Path) -> tuple[Path, Path]:
    """A made-up results file and test log with every section: the dry run's input."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.jsonl"
    path.unlink(missing_ok=True)
    r = Results(path, echo=False)
    r.add("status", part="tests", rc=0, seconds=1.0, cap_s=75)
    r.add("device", device="DRY RUN (no GPU)", torch="0", date="dry run", cuda=None, bf16_peak_tflops=989.0)
    for p in ("fp32", "tf32", "bf16"):
        for b in (1, 8):
            r.add("detector", precision=p, batch=b, images=16, images_per_s=1.0, ms_per_image=1.0, peak_gib=1.0)
    for st, share in (("backbone", 0.3), ("res5 head", 0.5), ("selection", 0.2)):
        r.add("detector_stages", precision="bf16", batch=8, stage=st, ms_per_image=1.0, share=share)
    r.add("detector_kernels", precision="fp32", batch=8, kernel="k", calls=1, ms=1.0, share=1.0)
    r.add("detector_bf16_vs_fp32", images=8, boxes_found_again=1.0, feature_cosine=1.0)
    r.add("gallery", what="gallery job in-process (decode in the loop, writes LMDB)", images_per_s=1.0)
    r.add("gallery_verdict", decode_bound=False, job_vs_detector=1.0, decode_processes_to_feed_detector=1)
    for task in ("valp", "tavp"):
        r.add("trainer", task=task, micro_batch=64, seq=80, compiled=False, fits=True, samples_per_s=1.0, mfu=0.5,
              peak_gib=1.0)
        r.add("trainer", task=task, micro_batch=128, seq=80, compiled=False, fits=False, peak_gib=2.0)
        r.add("trainer", task=task, micro_batch=64, seq=80, compiled=True, fits=True, samples_per_s=1.0, mfu=0.5)
    r.add("loader", workers=2, valp_samples_per_s=1.0, keeps_up_with_step=True)
    r.add("loop", workers_per_task=2, data_wait_share=0.0)
    junit = folder / "gpu_tests.xml"
    junit.write_text('<testsuites><testsuite><testcase name="test_a" time="0.1"/>'
                     '<testcase name="test_b" time="0.1"><skipped message="no CUDA"/></testcase>'
                     "</testsuite></testsuites>")
    return path, junit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path)
    ap.add_argument("--junit", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sample", type=Path, metavar="DIR", help="dry run: write and render made-up rows in DIR")
    a = ap.parse_args(argv)
    if a.sample:
        a.results, a.junit = sample(a.sample)
        a.out = a.out or a.sample / "gpu_report.md"
    if a.results is None or a.out is None:
        ap.error("--results and --out (or --sample DIR)")
    rows = read_results(a.results)
    plain, md = render(rows, read_junit(a.junit))
    a.out.write_text(md, encoding="utf-8")
    print(plain)
    print(f"report: {a.out}")
    if a.sample and ("not measured" in plain or "FAILED" in plain):
        print("dry run: the report writer left a headline figure empty", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
