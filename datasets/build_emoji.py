"""Rebuild the bundled demo dataset `datasets/emoji32.zip` from the Noto Color Emoji font.

Requirements (Debian/Ubuntu), from the repository root:
    apt-get install -y fonts-noto-color-emoji     # provides /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
    pip install -e . fonttools

Usage:
    python datasets/build_emoji.py [--font PATH] [--dest datasets/emoji32.zip] [--size 32]

Recipe. The font stores one colour PNG bitmap per glyph (136x128 px at 109 ppem) in its CBDT table. Each bitmap is
composited on white (emoji are drawn on a transparent background; white is how they appear in text), centred on a
white 136x136 square so every emoji keeps the scale it has in the font, and downsampled to size x size with Pillow's
LANCZOS filter (sharp edges without ringing visible at 32 px). Sequences with a skin-tone modifier (U+1F3FB..U+1F3FF)
are left out: they redraw another emoji in another skin colour and would double the archive's size for little
variety. Each image is named after the code point sequence that selects its glyph, e.g.
`emoji_u1f600.png` or `emoji_u1f468_200d_1f469.png`; the common prefix `emoji` gives one class to the loader.

The output is deterministic: members in sorted order, fixed timestamps and attributes, stored uncompressed (PNG is
compressed already), so the same font with the same Pillow/zlib gives the same zip bytes. Built from Debian's
fonts-noto-color-emoji 2.042-0+deb12u1; licence and attribution: datasets/LICENSE_emoji.txt.
"""

import argparse
import io
import os

from fontTools.ttLib import TTFont
from PIL import Image
from tqdm import tqdm

from guided_diffusion.image_datasets import ImageSetWriter, encode_png

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
DEFAULT_DEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emoji32.zip")
SKIN_TONE_MODIFIERS = frozenset(range(0x1F3FB, 0x1F400))   # Fitzpatrick types 1-2 .. 6


def glyph_sequences(font):
    """Map each glyph name to the shortest code point sequence that produces it.

    Single code points come from the cmap; multi-code-point emoji (ZWJ sequences, skin tones, flags, keycaps) are
    the ligature substitutions (GSUB lookup type 4) whose components all have code points.
    """
    glyph_to_codepoint = {}
    for codepoint, glyph in sorted(font.getBestCmap().items()):
        glyph_to_codepoint.setdefault(glyph, codepoint)
    sequences = {glyph: (codepoint,) for glyph, codepoint in glyph_to_codepoint.items()}
    for lookup in font["GSUB"].table.LookupList.Lookup:
        if lookup.LookupType != 4:
            continue
        for subtable in lookup.SubTable:
            for first, ligatures in subtable.ligatures.items():
                for ligature in ligatures:
                    components = [first, *ligature.Component]
                    if not all(c in glyph_to_codepoint for c in components):
                        continue
                    sequence = tuple(glyph_to_codepoint[c] for c in components)
                    known = sequences.get(ligature.LigGlyph)
                    if known is None or (len(sequence), sequence) < (len(known), known):
                        sequences[ligature.LigGlyph] = sequence
    return sequences


def emoji_file_name(sequence):
    """(0x1F468, 0x200D) -> "emoji_u1f468_200d.png"."""
    return "emoji_u" + "_".join(f"{codepoint:x}" for codepoint in sequence) + ".png"


def render_bitmap(png_bytes, canvas_side, size):
    """RGBA glyph PNG -> RGB size x size image on white, centred on a canvas_side square."""
    glyph = Image.open(io.BytesIO(png_bytes)).convert("RGBA")
    canvas = Image.new("RGBA", (canvas_side, canvas_side), (255, 255, 255, 255))
    offset = ((canvas_side - glyph.width) // 2, (canvas_side - glyph.height) // 2)
    canvas.alpha_composite(glyph, offset)
    return canvas.convert("RGB").resize((size, size), resample=Image.LANCZOS)


def build_dataset(font_path, dest, size):
    """Render the font's emoji bitmaps (without skin-tone variants) as size x size PNGs into a zip (or folder).

    :return: the number of images written.
    """
    if not os.path.isfile(font_path):
        raise FileNotFoundError(
            f"font {font_path!r} not found; install it with `apt-get install -y fonts-noto-color-emoji` "
            "or pass --font"
        )
    font = TTFont(font_path)
    if "CBDT" not in font:
        raise ValueError(f"font {font_path!r} has no CBDT colour bitmaps; use NotoColorEmoji.ttf (the CBDT build)")
    bitmaps = font["CBDT"].strikeData[0]
    canvas_side = max(max(g.metrics.width, g.metrics.height) for g in bitmaps.values())
    sequences = glyph_sequences(font)
    names = {
        emoji_file_name(sequences[glyph]): glyph
        for glyph in bitmaps
        if glyph in sequences and not SKIN_TONE_MODIFIERS.intersection(sequences[glyph])
    }
    with ImageSetWriter(dest) as writer:
        for name in tqdm(sorted(names), desc="rendering emoji", unit="img"):
            writer.add(name, encode_png(render_bitmap(bitmaps[names[name]].imageData, canvas_side, size)))
    return len(names)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--font", default=DEFAULT_FONT, help="NotoColorEmoji.ttf (CBDT build)")
    parser.add_argument("--dest", default=DEFAULT_DEST, help="output .zip (or a folder)")
    parser.add_argument("--size", type=int, default=32, help="output side in pixels")
    args = parser.parse_args()
    count = build_dataset(args.font, args.dest, args.size)
    print(f"wrote {count} images of {args.size}x{args.size} to {args.dest}")


if __name__ == "__main__":
    main()
