"""Data: layout and image checks, transforms, the mindspore.dataset pipeline, the frozen-backbone feature cache."""
