"""Compression of fine-tuned encoders: post-training int8 quantization (`quantize`), its saved
folder (`int8_dir`) and the eval step that runs it (`inference`)."""

from jaxfm.compress.inference import Int8Inference, int8_inference
from jaxfm.compress.int8_dir import Int8Model, is_int8_dir
from jaxfm.compress.quantize import MODES

__all__ = ["MODES", "Int8Inference", "Int8Model", "int8_inference", "is_int8_dir"]
