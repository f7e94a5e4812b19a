"""Regenerate the demo corpus in data/ from Debian's openclipart-png and openclipart-svg packages.

    apt-get install openclipart-png openclipart-svg
    python data/make_corpus.py            # rewrites data/images/ and the three CSV files

Each chosen PNG is composited over white, scaled to at most 128 pixels a side and stored as a
256-colour PNG under ``images/<category>/``. It gets two captions from the matching SVG's
metadata, both starting with the category, which is given by the package folder it came from: a
short one with the title (or the file name when the title is missing or boilerplate), "a flag:
Benin", and a long one that adds a short description and the keywords, "a flag: Benin. united
nations member, flag, africa, sign". About 15% of every
category is held out, chosen by a hash of the file name, so the split is stable across runs.

Output: ``captions.csv`` (every caption of every image, what the demo indexes), ``heldout.csv``
(the held-out images' captions, what the demo evaluates on) and ``train.csv`` (what the demo model
trains on: each other image with its long caption and with its category alone, "a flag"), with the
columns image, caption, category, title, keywords, source.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import re
import shutil
import sys
from pathlib import Path

from PIL import Image

PNG = Path("/usr/share/openclipart/png")
SVG = Path("/usr/share/openclipart/svg")
HERE = Path(__file__).resolve().parent
SIDE = 128
PER_CATEGORY = 150
HELD_OUT = 0.15

# Category -> package folders (a trailing "/*" takes the folder's own files only, not subfolders).
CATEGORIES = {
    "flag": ["signs_and_symbols/flags"],
    "animal": ["animals"],
    "person": ["people/*", "people/stickmen"],
    "food": ["food"],
    "vehicle": ["transportation/vehicles", "transportation/boating"],
    "building": ["buildings/*", "buildings/homes"],
    "plant": ["plants"],
    "musical instrument": ["recreation/music"],
    "computer": ["computer/hardware"],
    "tool": ["tools/*"],
    "clock": ["signs_and_symbols/clocks"],
    "weather symbol": ["signs_and_symbols/weather"],
    "road sign": ["transportation/roadsigns"],
    "sport": ["recreation/sports"],
    "star": ["shapes/stars"],
    "arrow": ["shapes/arrows"],
}
_BOILERPLATE = re.compile(r"^(clipart by|open clip art|untitled|image|drawing|svg)", re.I)
_NOISE_WORDS = {"", "clip art", "clipart", "openclipart", "svg", "png", "image", "remix", "media", "icon"}


def files_of(patterns: list[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        if pattern.endswith("/*"):
            found += sorted((PNG / pattern[:-2]).glob("*.png"))
        else:
            found += sorted((PNG / pattern).rglob("*.png"))
    return found


def spread(files: list[Path], n: int) -> list[Path]:
    """At most ``n`` files, spread evenly over the sorted list (every subfolder gets its share)."""
    if len(files) <= n:
        return files
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def metadata(png: Path) -> tuple[str, str, list[str]]:
    """Title, description and keywords of the SVG that ``png`` was rendered from."""
    svg = SVG / png.relative_to(PNG).with_suffix(".svg")
    text = svg.read_text(encoding="utf-8", errors="replace") if svg.is_file() else ""
    work = re.search(r"<cc:Work.*?</cc:Work>", text, re.S)
    block = work.group(0) if work else ""

    def first(tag: str) -> str:
        found = re.search(rf"<dc:{tag}>([^<]*)</dc:{tag}>", block)
        return " ".join(html.unescape(found.group(1)).split()) if found else ""

    subject = re.search(r"<dc:subject>.*?</dc:subject>", block, re.S)
    words = re.findall(r"<rdf:li>([^<]*)</rdf:li>", subject.group(0)) if subject else []
    cleaned = (" ".join(w.replace("_", " ").split()).lower() for w in words if "hash(" not in w)
    keywords = list(dict.fromkeys(w for w in cleaned if w not in _NOISE_WORDS))
    return first("title"), first("description"), keywords


def captions_of(png: Path, category: str, title: str, description: str, keywords: list[str]) -> list[str]:
    """Two captions: the short one (category and title), and the long one with the rest."""
    if not title or _BOILERPLATE.match(title) or re.fullmatch(r"[\w-]*\d+", title):
        # The file name, without the author and numbering the library appended.
        title = re.sub(r"(_\d+|_r|_)+$", "", png.stem).replace("_", " ").replace("-", " ")
    title = title.replace("_", " ").replace("-", " ").strip()
    parts = [f"{with_article(category)}: {title}"]
    sentence = description.split(". ")[0].strip().rstrip(".")
    personal = "@" in sentence or "http" in sentence or "www." in sentence
    if sentence and not personal and len(sentence) <= 100 and sentence.lower() != title.lower():
        parts.append(sentence)
    if keywords:
        parts.append(", ".join(keywords[:8]))
    return [parts[0], ". ".join(parts)] if len(parts) > 1 else parts


def with_article(category: str) -> str:
    return f"{'an' if category[0] in 'aeiou' else 'a'} {category}"


def training_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The demo model's training pairs: each image with its fullest caption, and with its category
    alone ("a flag"). Images of a category share that caption, so the loss treats them as each
    other's positives there: the small image tower learns what a category looks like, not only
    which of its neighbours is which."""
    by_image: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row)
    out = []
    for image_rows in by_image.values():
        fullest = max(image_rows, key=lambda r: len(r["caption"]))
        out += [fullest, {**fullest, "caption": with_article(fullest["category"])}]
    return out


def held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < HELD_OUT


def small_png(source: Path) -> bytes:
    Image.MAX_IMAGE_PIXELS = None  # the package's own files, some of them very large
    with Image.open(source) as image:
        image.load()
        rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    rgb.thumbnail((SIDE, SIDE), Image.LANCZOS)
    out = io.BytesIO()
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return out.getvalue()


def main() -> None:
    if not PNG.is_dir() or not SVG.is_dir():
        sys.exit("needs Debian's openclipart-png and openclipart-svg packages (apt-get install them first)")
    images = HERE / "images"
    shutil.rmtree(images, ignore_errors=True)
    rows = []
    for category, patterns in CATEGORIES.items():
        folder = images / category.replace(" ", "_")
        folder.mkdir(parents=True)
        for png in spread(files_of(patterns), PER_CATEGORY):
            target = folder / png.name
            if target.exists():
                target = folder / f"{png.stem}_{len(rows)}.png"
            try:
                target.write_bytes(small_png(png))
            except OSError as e:
                print(f"skipped {png}: {e}", file=sys.stderr)
                continue
            title, description, keywords = metadata(png)
            for caption in captions_of(png, category, title, description, keywords):
                rows.append(
                    {
                        "image": target.relative_to(HERE).as_posix(),
                        "caption": caption,
                        "category": category,
                        "title": title,
                        "keywords": ", ".join(keywords),
                        "source": png.relative_to(PNG).as_posix(),
                    }
                )
        print(f"{category}: {len({r['image'] for r in rows if r['category'] == category})}", file=sys.stderr)
    for name, chosen in (
        ("captions.csv", rows),
        ("train.csv", training_rows([r for r in rows if not held_out(r["source"])])),
        ("heldout.csv", [r for r in rows if held_out(r["source"])]),
    ):
        with (HERE / name).open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(chosen)
        print(f"{name}: {len(chosen)} rows", file=sys.stderr)


if __name__ == "__main__":
    main()
