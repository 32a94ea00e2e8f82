"""Data for etc-ext: the generated shapes VQA set.

- `etc_ext.data.shapes`: `generate_shapes_dataset(...)` writes the colored-shapes instruction-VQA set (also
  `python -m etc_ext.data.shapes --out DIR --num-images N --seed S`).
"""

from .shapes import DEFAULT_IMAGE_SIZE, QUESTION_TYPES, generate_shapes_dataset


__all__ = ["DEFAULT_IMAGE_SIZE", "QUESTION_TYPES", "generate_shapes_dataset"]
