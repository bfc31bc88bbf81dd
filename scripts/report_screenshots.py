"""Screenshots of a dissection report (its top, one unit's row, the legend) with headless Chromium.

    gandissect-jax dissect --outdir D
    python scripts/report_screenshots.py D/dissect.html --layer layer4 --unit 91 --out docs

Writes ``<out>/report-top.png`` (the first 1280 x 900 pixels), ``<out>/report-unit.png`` (the
row of ``--unit`` in ``--layer``, opened by the report's own link ``#layer=..&unit=..``, which
marks the row) and ``<out>/report-legend.png``. Chromium takes the screenshots (Debian's
``chromium``); the rows are cut out by the background colours the report gives them, with Pillow.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

TARGET = (255, 248, 208)  # .unit.target background in report.py
LEGEND = (247, 247, 244)  # .legend background


def screenshot(page: Path, fragment: str, size: tuple[int, int], out: Path) -> np.ndarray:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    if browser is None:
        raise SystemExit("chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={profile}", "--virtual-time-budget=8000", f"--screenshot={out}",
                        f"--window-size={size[0]},{size[1]}", page.resolve().as_uri() + fragment],
                       check=True, capture_output=True, timeout=180)
    return np.asarray(Image.open(out).convert("RGB"))


def rows_of(image: np.ndarray, column: int, color: tuple[int, int, int]) -> tuple[int, int]:
    """First and last row whose pixel in ``column`` has ``color``."""
    rows = np.nonzero((np.abs(image[:, column].astype(int) - color) <= 1).all(axis=1))[0]
    if rows.size == 0:
        raise SystemExit(f"no rows of colour {color} in column {column}")
    return int(rows.min()), int(rows.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="dissect.html")
    parser.add_argument("--layer", required=True)
    parser.add_argument("--unit", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        top = screenshot(args.report, "", (1280, 900), Path(work) / "top.png")
        Image.fromarray(top).save(args.out / "report-top.png", optimize=True)
        first, last = rows_of(top, 20, LEGEND)
        right = int(np.nonzero((np.abs(top[first + 4].astype(int) - LEGEND) <= 1).all(axis=1))[0].max())
        Image.fromarray(top[max(first - 2, 0):last + 3, 8:right + 10]).save(args.out / "report-legend.png",
                                                                             optimize=True)
        tall = screenshot(args.report, f"#layer={args.layer}&unit={args.unit}", (1280, 16000), Path(work) / "tall.png")
        first, last = rows_of(tall, 1200, TARGET)
        Image.fromarray(tall[first - 4:last + 5, :1120]).save(args.out / "report-unit.png", optimize=True)
    print("wrote", *(args.out / f"report-{n}.png" for n in ("top", "unit", "legend")))


if __name__ == "__main__":
    main()
