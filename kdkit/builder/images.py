"""Decoding one image file, for training data and ``kdkit predict``.

PIL decodes; this adds what a long run needs around it: a file PIL cannot decode (empty, truncated,
not an image) or one over PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485
pixels by default) raises ``UnreadableImage`` naming the file and the reason, and 16-bit greyscale
(``I;16``, which ``convert`` would clip to nearly all white) is scaled to 8 bits first.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from kdkit.errors import UnreadableImage

SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image(file: str | os.PathLike | bytes, mode: str = "RGB", name: str | None = None) -> Image.Image:
    """The image in ``file`` (a path, or the bytes of the file ``name``), decoded and converted to ``mode``."""
    name = name or str(file)
    try:
        with warnings.catch_warnings():  # PIL only warns between its limit and twice it: refuse it all alike
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(file) if isinstance(file, bytes) else file) as image:
                if image.mode in SIXTEEN_BIT_GREY:
                    image = Image.fromarray((np.asarray(image) / 257).round().astype(np.uint8))
                return image.convert(mode)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        reason = f"it has more than {Image.MAX_IMAGE_PIXELS:,} pixels, the limit (a decompression bomb?)"
    except UnidentifiedImageError:
        empty = len(file) == 0 if isinstance(file, bytes) else os.path.getsize(file) == 0
        reason = "the file is empty" if empty else "not an image file PIL can decode"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # what PIL's decoders raise for broken data
        reason = str(exc)
    raise UnreadableImage(f"{name}: cannot read the image: {reason}")
