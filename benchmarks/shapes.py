"""Parameter shapes of common networks: :mod:`gradclip_book.shapes`, shared with chapter 5.1's cost table."""

from __future__ import annotations

from gradclip_book.shapes import RESNET50_NUMEL, model_shapes, numel, resnet50_shapes, transformer_small_shapes

__all__ = ["RESNET50_NUMEL", "model_shapes", "numel", "resnet50_shapes", "transformer_small_shapes"]

if __name__ == "__main__":
    shapes = resnet50_shapes()
    print(len(shapes), numel(shapes))
    assert len(shapes) == 161 and numel(shapes) == RESNET50_NUMEL
