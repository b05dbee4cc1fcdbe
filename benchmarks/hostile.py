"""Memory of `edgekd predict` on hostile image shapes (issue 18, acceptance 3): peak RSS of a fresh predict process
on a few good images, then on the same images with a real 62 KB PNG of 1 x 63,999,999 pixels (and a 400000 x 1
one) between them; the bad file must be reported and the rest predicted and written.

    .venv/bin/python benchmarks/hostile.py [--bundle runs/demo/student/bundle]

Each predict is its own process; its peak RSS is the kernel's (os.wait4 rusage, which counts the forked parent's pages
before exec, so the images are made in another process and this one stays small: its own peak is recorded). Writes
benchmarks/results/hostile.json and the RESULTS.md section between `<!-- hostile:begin -->` / `<!-- hostile:end -->`.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, RESULTS, machine_line, results_doc, run_main, write_section  # noqa: E402

from edgekd.fileio import write_json  # noqa: E402

GOAL_MB = 300.0
EDGEKD = [sys.executable, "-m", "edgekd"]
MARKERS = ("<!-- hostile:begin -->", "<!-- hostile:end -->")
LARGE = "8000 x 8000 RGB JPEG (allowed)"  # no memory goal: its peak is what a 64-MP image costs (serve docs)


def peak_rss_predict(args: list[str]) -> tuple[int, float, str]:
    """Run `edgekd predict ARGS` in a fresh process -> (exit code, peak RSS MB, stderr)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*EDGEKD, "predict", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, usage.ru_maxrss / 1024, err.read()


MAKE_IMAGES = """
import sys
import numpy as np
from PIL import Image
tmp = sys.argv[1]
for i in range(3):
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64), dtype=np.uint8)).save(f"{tmp}/good{i}.png")
# real (fully decodable) black 1-bit PNGs: they compress to a few KB
Image.new("1", (1, 63_999_999)).save(f"{tmp}/tall.png", optimize=True)
Image.new("1", (400_000, 1)).save(f"{tmp}/wide.png", optimize=True)
# not hostile: a legitimate photo at the runtime's 64-MP limit (noise, so the decoder does real work)
Image.fromarray(np.random.default_rng(9).integers(0, 256, (8000, 8000, 3), dtype=np.uint8)).save(
    f"{tmp}/large.jpg", quality=90)
"""


def section(doc: dict) -> str:
    """The RESULTS.md section from a hostile.json document."""
    command, parent_mb, records = doc["command"], doc["parent_peak_rss_mb"], doc["records"]
    lines = ["<!-- hostile:begin -->", "## Hostile image shapes: memory of `edgekd predict`", "",
             f"`{command}` — {doc['date']}, {machine_line(doc['machine'])}. A fresh `edgekd predict --backend onnx` process per row "
             f"(peak RSS from the kernel; it includes up to the launching process's {parent_mb:.0f} MB, forked before exec), "
             "3 good 64 px PNGs with the hostile file second; goal: peak RSS < "
             f"{GOAL_MB:.0f} MB, the bad file reported, the rest predicted and written. The last row is no hostile "
             "file but a legitimate 64-MP photo (the runtime's pixel limit), all 4 to be predicted: its peak RSS, "
             "without a goal, is what decoding the largest image allowed costs.", "",
             "| case | file size | exit | peak RSS MB | predicted | reported | goal |", "|---|---:|---:|---:|---:|---|---|"]
    for r in records:
        size = ("-" if r["file_bytes"] is None else f"{r['file_bytes']} B" if r["file_bytes"] < 10240
                else f"{r['file_bytes'] / 1024:.0f} KB")
        reported = "; ".join(x.split(": ", 2)[-1] for x in r["reported"]) or "-"
        lines.append(f"| {r['case']} | {size} | {r['exit']} | {r['peak_rss_mb']:.0f} | {r['predicted']} of "
                     f"{r['images']} | {reported} | {'met' if r['met'] else 'MISSED'}"
                     f"{' (all predicted; no memory goal)' if r.get('goal_mb', GOAL_MB) is None else ''} |")
    lines += ["", "<!-- hostile:end -->"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "runs" / "demo" / "student" / "bundle",
                        help="the bundle to feed hostile inputs (default: make demo's)")
    args = parser.parse_args()
    if not args.bundle.exists():
        print(f"error: {args.bundle}: no bundle (run `make demo` first, or pass --bundle)", file=sys.stderr)
        return 2
    command = shlex.join([".venv/bin/python", "benchmarks/hostile.py", *sys.argv[1:]])
    records = []
    with tempfile.TemporaryDirectory(prefix="edgekd-hostile-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-c", MAKE_IMAGES, str(tmp)], check=True)
        good = [tmp / f"good{i}.png" for i in range(3)]
        cases = {"good images only": None, "1 x 63,999,999 PNG": tmp / "tall.png", "400000 x 1 PNG": tmp / "wide.png",
                 LARGE: tmp / "large.jpg"}
        for name, bad in cases.items():
            files = [good[0], *([bad] if bad else []), good[1], good[2]]
            out = tmp / f"{len(records)}.csv"
            code, rss, err = peak_rss_predict([str(args.bundle), *map(str, files), "--backend", "onnx",
                                               "--out", str(out)])
            rows = list(csv.DictReader(out.open())) if out.exists() else []
            predicted = sum(1 for r in rows if r["label"])
            record = {"case": name, "file_bytes": bad.stat().st_size if bad else None, "exit": code,
                      "peak_rss_mb": round(rss, 1), "images": len(files), "predicted": predicted,
                      "reported": [ln for ln in err.splitlines() if ln.startswith("error:")],
                      "goal_mb": None if name == LARGE else GOAL_MB,
                      "met": predicted == 4 if name == LARGE else rss < GOAL_MB and predicted == 3}
            records.append(record)
            print(f"{name}: exit {code}, peak RSS {rss:.0f} MB, {predicted} of {len(files)} predicted", flush=True)
    parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    doc = results_doc("hostile", command, records, bundle=str(args.bundle), parent_peak_rss_mb=round(parent_mb, 1))
    write_json(RESULTS / "hostile.json", doc)
    write_section(section(doc), *MARKERS)
    print(f"wrote {RESULTS / 'hostile.json'} and the RESULTS.md section")
    return 0


if __name__ == "__main__":
    run_main(main)
