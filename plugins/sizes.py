"""The recipe ranges of the built-in models' size keys, shared by the student and teacher factories.

The maxima are far above any published model of each kind: they exist to refuse a typo (``embed_dim =
1e7``) with a clear message before a layer tries to allocate petabytes.
"""
from __future__ import annotations

from typing import Annotated

from kdkit.api import MAX_CLASSES, MAX_IMAGE_SIZE, Range

Channels = Annotated[int, Range(ge=1, le=64)]  # input channels
ImageSize = Annotated[int, Range(ge=1, le=MAX_IMAGE_SIZE)]
PatchSize = Annotated[int, Range(ge=1, le=256)]
Depth = Annotated[int, Range(ge=1, le=64)]  # transformer or mixer blocks
Width = Annotated[int, Range(ge=1, le=16_384)]  # an embedding's size
AttentionHeads = Annotated[int, Range(ge=1, le=256)]
Classes = Annotated[int, Range(ge=1, le=MAX_CLASSES)]
DropRate = Annotated[float, Range(ge=0, lt=1)]
