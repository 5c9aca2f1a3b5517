"""Class predictions for image files, with the trained model's own eval transform."""
from __future__ import annotations

from pathlib import Path

import torch

from kdkit.builder.data import build_transforms
from kdkit.builder.images import read_image
from kdkit.errors import KdkitError
from kdkit.recipe.sections import AugmentConfig
from kdkit.store.export import load


def image_files(paths: list[Path]) -> list[Path]:
    """The files given, with every folder replaced by the image files under it (by extension, sorted)."""
    from PIL import Image

    extensions = set(Image.registered_extensions())
    files = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in extensions and p.is_file())
        if not found:
            raise KdkitError(f"{path}: no image files in this folder")
        files += found
    return files


def predict_files(model_path: str | Path, images: list[Path], top: int = 5) -> list[tuple[Path, list]]:
    """``[(image, [(class name, probability), ...]), ...]``, most probable first; a folder stands for
    every image file under it."""
    images = image_files(images)
    model = load(model_path)
    meta = model.meta
    transform = build_transforms(meta["image_size"], AugmentConfig(), meta["mean"], meta["std"], train=False,
                                 crop_pct=meta["crop_pct"])
    mode = "L" if meta["in_chans"] == 1 else "RGB"
    results = []
    for path in images:
        with torch.no_grad():
            probs = model.predict(transform(read_image(path, mode)).unsqueeze(0)).softmax(-1)[0]
        values, indices = probs.topk(min(top, len(probs)))
        results.append((path, [(meta["class_names"][i], v.item()) for v, i in zip(values, indices.tolist())]))
    return results
