"""Rebuild sample/images/ (the demo's real photos) from images shipped inside permissively licensed PyPI packages.

Run it with a throwaway environment, never the project's own (these packages are not project dependencies):

    python3 -m venv /tmp/samplevenv
    /tmp/samplevenv/bin/pip install scikit-image==0.26.0 scikit-learn==1.9.1 pillow
    /tmp/samplevenv/bin/python scripts/make_sample.py            # writes sample/images/*.jpg

Each image is converted to RGB or L, shrunk (never enlarged) so its long side is at most 640 px, and saved as a
baseline JPEG at quality 90 without metadata, so the same package versions give the same bytes. Captions are hand
written (after looking at each picture) and kept in this file, so the sample is reproducible as a whole: most go to
``captions.jsonl``; the ones listed in ``SIDECAR`` go to ``<stem>.txt`` beside the image instead, to exercise both
caption sources. Licences and credits: sample/LICENSE.md (also generated from SOURCES below).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

LONG_SIDE = 640
JPEG_QUALITY = 90
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SampleSource:
    """One bundled photo: where it comes from inside a package, its credit and licence as the package states them."""

    name: str  # output stem: sample/images/<name>.jpg
    package: str  # importable package that ships the file
    relative_path: str  # file inside the package
    credit: str
    licence: str
    statement: str  # where and how the package states the licence


_SKIMAGE_DOC = "scikit-image 0.26 `skimage/data/_fetchers.py`, docstring of `skimage.data.{}()`"
_SKLEARN_DOC = "scikit-learn 1.9 `sklearn/datasets/images/README.txt`"

SOURCES: tuple[SampleSource, ...] = (
    SampleSource("astronaut", "skimage", "data/astronaut.png", "NASA (Great Images database, flic.kr/p/r9qvLn); "
                 "portrait of astronaut Eileen Collins", "Public domain",
                 _SKIMAGE_DOC.format("astronaut") + ": \"No known copyright restrictions, released into the public "
                 "domain.\""),
    SampleSource("chelsea", "skimage", "data/chelsea.png", "Stefan van der Walt", "CC0",
                 _SKIMAGE_DOC.format("chelsea") + ": \"No copyright restrictions. CC0 by the photographer (Stefan "
                 "van der Walt).\""),
    SampleSource("coffee", "skimage", "data/coffee.png", "Rachel Michetti; courtesy of Pikolo Espresso Bar", "CC0",
                 _SKIMAGE_DOC.format("coffee") + ": \"No copyright restrictions. CC0 by the photographer (Rachel "
                 "Michetti).\""),
    SampleSource("rocket", "skimage", "data/rocket.jpg", "SpaceX (flickr.com/photos/spacexphotos/16511594820)",
                 "Public domain",
                 _SKIMAGE_DOC.format("rocket") + ": \"The image was captured by SpaceX and released in the public "
                 "domain.\""),
    SampleSource("retina", "skimage", "data/retina.jpg", "Mikael Häggström (Wikimedia Commons, "
                 "File:Fundus_photograph_of_normal_left_eye.jpg)", "CC0 1.0",
                 _SKIMAGE_DOC.format("retina") + ": \"This file is made available under the Creative Commons CC0 1.0 "
                 "Universal Public Domain Dedication.\""),
    SampleSource("immunohistochemistry", "skimage", "data/ihc.png", "Center for Microscopy And Molecular Imaging "
                 "(CMMI)", "No known copyright restrictions",
                 _SKIMAGE_DOC.format("immunohistochemistry") + ": \"No known copyright restrictions.\""),
    SampleSource("camera", "skimage", "data/camera.png", "Lav Varshney", "CC0",
                 _SKIMAGE_DOC.format("camera") + ": \"No copyright restrictions. CC0 by the photographer (Lav "
                 "Varshney).\""),
    SampleSource("clock", "skimage", "data/clock_motion.png", "Stefan van der Walt", "Public domain",
                 _SKIMAGE_DOC.format("clock") + ": \"Released into the public domain by the photographer (Stefan van "
                 "der Walt).\""),
    SampleSource("coins", "skimage", "data/coins.png", "Brooklyn Museum Collection (opencollection archives image "
                 "51611)", "No known copyright restrictions",
                 _SKIMAGE_DOC.format("coins") + ": \"No known copyright restrictions.\""),
    SampleSource("brick", "skimage", "data/brick.png", "CC0Textures (Bricks25), perspective-corrected by "
                 "scikit-image", "CC0",
                 _SKIMAGE_DOC.format("brick") + ": \"licensed under the Creative Commons CC0 License.\""),
    SampleSource("grass", "skimage", "data/grass.png", "linolafett (DeviantArt, Grass-01-434853879)", "CC0",
                 _SKIMAGE_DOC.format("grass") + ": \"licensed under the Creative Commons CC0 License.\""),
    SampleSource("gravel", "skimage", "data/gravel.png", "CC0Textures (Gravel04)", "CC0",
                 _SKIMAGE_DOC.format("gravel") + ": \"licensed under the Creative Commons CC0 License.\""),
    SampleSource("china", "sklearn", "datasets/images/china.jpg", "danielbuechele (flickr.com/photos/danielbuechele/"
                 "6061409035); retrieved by Robert Layton", "CC BY 2.0",
                 _SKLEARN_DOC + ": \"Released under a creative commons license. "
                 "[https://creativecommons.org/licenses/by/2.0/] Attribution: Some rights reserved by "
                 "danielbuechele\""),
    SampleSource("flower", "sklearn", "datasets/images/flower.jpg", "vultilion (flickr.com/photos/vultilion/"
                 "6056698931); retrieved by Robert Layton", "CC BY 2.0",
                 _SKLEARN_DOC + ": \"Released under a creative commons license. "
                 "[https://creativecommons.org/licenses/by/2.0/]\" (the README's attribution line names "
                 "danielbuechele, its source link is the photographer vultilion's Flickr page)"),
)

# Captions were written while looking at the resized pictures; they describe only what is visible.
CAPTIONS: dict[str, str] = {
    "astronaut": (
        "A studio portrait of a smiling woman astronaut with short light brown hair, wearing a bright orange "
        "pressure suit with a round silver metal neck ring and a black collar. A round blue mission patch is "
        "sewn on the left side of the suit in the picture and a small blue name tag on the right side. On "
        "the left, a red and white striped American flag with white stars on a blue field hangs behind her "
        "shoulder. To the right, a small white space shuttle model with a brown external tank stands on a "
        "black pedestal, and in front of it rests a glossy black helmet with a silver rim. The background is a "
        "mottled grey and cream backdrop."
    ),
    "chelsea": (
        "A close-up photograph of the face of a tabby cat with soft striped fur in shades of tan, brown and "
        "cream. Two large round yellowish green eyes with black pupils look slightly to the left of the "
        "camera. The cat has a small pinkish orange nose, long thin white whiskers and dark brown stripes "
        "running from its forehead down between its pointed ears. The tips of both ears are cut off by the "
        "top edge of the frame. The blurred background behind the cat is a pale white and beige room."
    ),
    "coffee": (
        "A small white porcelain espresso cup with a glossy dark red outer glaze sits on a matching round red "
        "saucer. The cup is full of espresso with a smooth light brown crema on top. A shiny silver metal "
        "teaspoon rests on the saucer to the right of the cup, its handle leaning against the rim of the cup. "
        "The cup's loop handle points toward the bottom left. The saucer stands on a weathered wooden table "
        "with a warm orange brown grain, scratches and worn patches, lit from above so the porcelain shows "
        "bright white highlights."
    ),
    "rocket": (
        "A tall white rocket stands upright on a launch pad at dusk under a deep blue sky with a few faint "
        "stars. Four thin metal lattice towers surround it: two tall dark steel towers frame the left and "
        "right edges of the picture, and two shorter grey towers with slender lightning masts stand closer on "
        "either side of the rocket. Bright orange floodlights glow with star-shaped glints along the ground "
        "at the bottom of the picture, and a low concrete platform supports the rocket. A dark line of trees "
        "and clouds lies along the horizon."
    ),
    "retina": (
        "A medical fundus photograph of the back of a human eye: a large round orange red disc on a black "
        "background. Many thin dark red blood vessels branch across the disc like the limbs of a tree. They "
        "start from a bright pale yellow circular spot, the optic disc, on the left side, arch above and "
        "below the centre, and split into smaller and smaller branches toward the edges. In the middle of the "
        "picture is a darker, slightly brownish red spot with no large vessels, the macula. A small square "
        "notch breaks the round edge at the top right."
    ),
    "immunohistochemistry": (
        "A microscope image of a stained tissue section. Several large rounded glands are stained a warm "
        "golden brown, with a dense texture of packed cells whose outlines form a fine net of darker brown "
        "lines and whose nuclei are pale bluish purple ovals. Two big glands fill the upper left and upper "
        "right, a third curved gland runs down the left edge, and a smaller round gland with a star-shaped "
        "pattern sits near the bottom centre. Between the glands lies pale blue and white fibrous tissue "
        "dotted with many small elongated dark blue nuclei. A bright white empty gap fills part of the left "
        "side."
    ),
    "camera": (
        "A black and white photograph of a man standing on a wide flat grass field, looking through a small "
        "film camera mounted on a tall metal tripod. He has short dark hair and wears a long black wool coat, "
        "a white shirt collar and black gloves, and leans forward on the left side of the picture with both "
        "hands on the camera. The thin silver tripod legs spread out in front of him. Behind him, far away on "
        "the right, are low buildings, a large domed building, a tall rectangular tower and several smaller "
        "towers under a pale, cloudless sky."
    ),
    "clock": (
        "A grey photograph of a round wall clock that is strongly blurred by horizontal camera motion. The "
        "clock is a pale oval shape in the centre of the picture with a lighter white face, smeared into "
        "horizontal streaks so that no hands or numbers can be read. A thin darker rim marks its top and "
        "bottom edges. The clock hangs on a flat, smooth, evenly lit wall of medium grey that fills the rest "
        "of the frame, with no other objects around it, and the left side of the wall is slightly darker than "
        "the right."
    ),
    "coins": (
        "A black and white photograph of twenty-four ancient Greek coins laid out on a dark grey cloth in "
        "four rows of six. The coins are round but slightly irregular, made of worn silver and bronze metal, "
        "and most show a profile head of a man or woman facing left or right. The coin at the top right is "
        "larger and shows a standing nude figure; a large coin on the right of the third row shows a head "
        "wearing a crested helmet. The coins in the bottom row are a little larger than those in the top row, "
        "and small gaps of dark background separate every coin."
    ),
    "brick": (
        "A grey photograph of a brick pavement or wall seen at a slight angle, filling the whole picture. "
        "Dozens of long rectangular bricks are laid in vertical columns in a running bond, each column offset "
        "by half a brick from its neighbours. Thin pale mortar joints separate the bricks and form a regular "
        "grid of light lines. The bricks have a rough, slightly speckled surface in medium and dark grey "
        "tones. Perspective makes the columns lean and narrow toward the upper right corner, where the bricks "
        "look smaller and the rows crowd together."
    ),
    "grass": (
        "A top-down grey photograph of a dense patch of lawn that fills the whole frame. Hundreds of thin, "
        "narrow blades of grass cross each other at every angle, forming a tangled, rough texture of light "
        "and dark strokes. Small round clover leaves in groups of three and a few broad, flat leaves are "
        "scattered among the blades, especially near the top and the centre. Deep shadows between the blades "
        "make dark gaps, while the tips of the blades catch the light and look almost white. There is no sky, "
        "ground edge or other object in view."
    ),
    "gravel": (
        "A grey top-down photograph of a bed of crushed gravel that fills the entire picture. Hundreds of "
        "small angular stones, each about the size of a fingertip, are piled closely together with sharp "
        "corners and flat broken faces. The stones are light grey and white on their upper faces and cast "
        "dark black shadows into the narrow gaps between them, which gives the surface a rough, granular "
        "texture. A few stones are darker or slightly larger than the rest, but the pattern is even from edge "
        "to edge, with no path, plant or horizon visible."
    ),
    "china": (
        "A tall Chinese pagoda tower with four tiers of curved roofs stands on the left side of the picture, "
        "high on a hill above a wide hazy lake. The roofs are covered with orange and yellow glazed tiles and "
        "edged with green and blue painted eaves, and the walls below each roof are red with rows of wooden "
        "lattice windows and red balconies. A round golden finial tops the highest roof. In front of the "
        "tower and along the right edge are dense green trees. Behind it the pale blue lake stretches to the "
        "horizon with many small boats, a long bridge and a small island under a pale blue sky."
    ),
    "flower": (
        "A close-up photograph of a single round dahlia flower in the centre of the picture. Its petals are a "
        "soft peach orange, rolled into small cups and arranged in tight spiralling rings that get smaller "
        "and darker toward the middle, giving a neat ball shape with a regular, scale-like pattern. Below it, "
        "at the bottom edge of the frame, the top of a second peach dahlia is just visible, cut off by the "
        "edge. The background is a smooth, out of focus blur of dark teal green leaves, and there is a small "
        "yellow green bud in the lower right corner."
    ),
}

# These captions go to a sidecar <stem>.txt instead of captions.jsonl.
SIDECAR = frozenset({"coffee", "clock"})


def package_file(package: str, relative_path: str) -> Path:
    """Return the absolute path of a data file shipped inside an installed package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed: see this script's docstring for the throwaway venv")
    path = Path(next(iter(spec.submodule_search_locations))) / relative_path
    if not path.is_file():
        raise SystemExit(f"{package} does not ship {relative_path} (expected at {path})")
    return path


def sample_image(source: Path) -> Image.Image:
    """Return the photo as RGB (or L for grey originals), shrunk so its long side is at most ``LONG_SIDE``."""
    with Image.open(source) as opened:
        image = opened.convert("L" if opened.mode in ("L", "I;16", "I") else "RGB")
    scale = LONG_SIDE / max(image.size)
    if scale < 1:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def licence_markdown() -> str:
    """Return sample/LICENSE.md: one entry per image with its source file, credit and licence statement."""
    lines = [
        "# Sample images: sources and licences",
        "",
        "Every image in `sample/images/` was taken from a file shipped inside a PyPI package and resized by",
        "`scripts/make_sample.py` (long side at most 640 px, JPEG quality 90). Only images whose licence, as the",
        "package states it, allows redistribution are included (public domain, CC0, no known copyright",
        "restrictions, or CC BY with the credit below). The captions are original to this project (Apache-2.0).",
        "",
        "| image | source package and file | credit | licence |",
        "|---|---|---|---|",
    ]
    for item in SOURCES:
        source = f"`{item.package}` `{item.relative_path}`"
        lines.append(f"| `{item.name}.jpg` | {source} | {item.credit} | {item.licence} |")
    lines += ["", "## Licence statements, as found in the packages", ""]
    for item in SOURCES:
        lines.append(f"- `{item.name}.jpg`: {item.statement}")
    lines += [
        "",
        "CC BY 2.0 images (`china.jpg`, `flower.jpg`) are modified (resized, re-encoded); licence text:",
        "https://creativecommons.org/licenses/by/2.0/.",
        "",
        "Left out on purpose: matplotlib's `grace_hopper.jpg` (the package states no licence for it), scikit-image's",
        "`motorcycle_left.png` (Middlebury stereo data, no licence stated), `moon.png` and `page.png` (no licence",
        "stated), `hubble_deep_field.jpg` (not a photo of objects), and drawings/synthetic images (horse, logo,",
        "colour wheel, chessboard).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "sample", help="sample folder to (re)write")
    args = parser.parse_args(argv)
    images_dir = args.out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    missing = [s.name for s in SOURCES if len(CAPTIONS.get(s.name, "").split()) < 30]
    if missing:
        raise SystemExit(f"captions missing or shorter than 30 words for: {', '.join(missing)}")
    jsonl_rows = []
    for item in SOURCES:
        image = sample_image(package_file(item.package, item.relative_path))
        image.save(images_dir / f"{item.name}.jpg", "JPEG", quality=JPEG_QUALITY, optimize=True)
        if item.name in SIDECAR:
            (images_dir / f"{item.name}.txt").write_text(CAPTIONS[item.name] + "\n", encoding="utf-8")
        else:
            jsonl_rows.append({"file": f"{item.name}.jpg", "caption": CAPTIONS[item.name]})
    with open(images_dir / "captions.jsonl", "w", encoding="utf-8") as handle:
        for row in jsonl_rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (args.out / "LICENSE.md").write_text(licence_markdown(), encoding="utf-8")
    total = sum(p.stat().st_size for p in images_dir.iterdir())
    print(f"wrote {len(SOURCES)} images to {images_dir} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
