"""Weight interop: Hugging Face BERT checkpoints and the jaxfm model dir."""

from jaxfm.interop.checkpoint_dir import load_model_dir, save_model_dir
from jaxfm.interop.hf import ExportResult, ImportResult, InteropError, export_hf, import_hf

__all__ = ["ExportResult", "ImportResult", "InteropError", "export_hf", "import_hf",
           "load_model_dir", "save_model_dir"]
