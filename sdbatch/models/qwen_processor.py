"""Qwen-Image-Edit's prompt processor without torchvision: transformers' ``Qwen2VLProcessor``
(the chat template's ``<|image_pad|>`` expanded to the source image's patch count, the image
cut into patches for the Qwen2.5-VL encoder) built from the folder's ``processor/`` image
processor, in its PIL form (``Qwen2VLImageProcessorPil``), and tokenizer, with no video
processor: transformers builds that one only with torchvision, and the edit pipelines pass no
video."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor


class ImageQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` of images and text only. Its sub-processors are the arguments its
    ``__init__`` names (``ProcessorMixin.get_attributes``), so leaving ``video_processor`` out of
    the signature leaves it out of the class check that needs torchvision."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_folder(cls, folder: Path) -> ImageQwen2VLProcessor:
        """The processor of a diffusers folder's ``processor/`` subfolder."""
        return cls(Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True), AutoTokenizer.from_pretrained(folder, local_files_only=True))
