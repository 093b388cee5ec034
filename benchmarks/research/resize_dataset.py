"""A copy of an MVTec-layout dataset with every image already at the model's input size, so that it loads
exactly as the original does and takes less room (a GPU machine reached over a small transfer):

    python -m benchmarks.research.resize_dataset ../shared/datasets/magnetic_tile /tmp/magnetic_tile_256 --size 256

Images are resized as engine.preprocess resizes them (INTER_AREA, the whole frame stretched) and masks as
train.data.load_mask does (INTER_NEAREST); an image already at the size is skipped by the pipeline's own
resize, so `load_images` and `load_mask` return the same arrays from the copy as from the original, for
gray images (magnetic_tile) and for colour ones loaded as RGB (a colour image scored in gray would be
converted after the resize instead of before it: a rounding apart). Names and folders are kept, other
files copied. Writes PNG at full compression into a new folder; refuses an existing one.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from engine.errors import ImageError
from engine.preprocess import IMAGE_SUFFIXES, read_image


def resized(image: np.ndarray, size: int, is_mask: bool) -> np.ndarray:
    """One decoded image (OpenCV layout) at size x size, interpolated as the pipeline interpolates it."""
    import cv2

    if image.shape[:2] == (size, size):
        return image
    interpolation = cv2.INTER_NEAREST if is_mask else cv2.INTER_AREA
    return cv2.resize(image, (size, size), interpolation=interpolation)


def resize_dataset(src: Path, dst: Path, size: int) -> int:
    """Write the resized copy; returns the number of images written."""
    import cv2

    count = 0
    for path in sorted(src.rglob("*")):
        out = dst / path.relative_to(src)
        if path.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            shutil.copy2(path, out)
            continue
        image = resized(read_image(path), size, is_mask="ground_truth" in path.relative_to(src).parts)
        ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        if not ok:
            raise ImageError(f"{path}: could not be encoded as PNG")
        # keep the name (masks are found by it): a .jpg keeps its suffix and holds PNG bytes, which
        # OpenCV decodes by content
        encoded.tofile(str(out))
        count += 1
    return count


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="MVTec-layout dataset root")
    parser.add_argument("dst", help="new folder for the copy")
    parser.add_argument("--size", type=int, required=True, help="the model's square input size (model.image_size)")
    args = parser.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        print(f"resize_dataset: error: {src}: no such dataset folder", file=sys.stderr)
        return 2
    if dst.exists():
        print(f"resize_dataset: error: {dst} exists; give a new folder (nothing is overwritten)", file=sys.stderr)
        return 2
    if args.size <= 0:
        print(f"resize_dataset: error: --size: got {args.size}, expected the model's input size in pixels",
              file=sys.stderr)
        return 2
    try:
        count = resize_dataset(src, dst, args.size)
    except ImageError as exc:
        print(f"resize_dataset: error: {exc}", file=sys.stderr)
        return 2
    print(f"{count} images at {args.size}x{args.size} in {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
