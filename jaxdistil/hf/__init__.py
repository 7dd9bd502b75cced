"""Hugging Face interop: import BERT/DistilBERT checkpoints, export verified ``*ForMaskedLM`` directories.

  load_model(path_or_hub_id, step=None) -> LoadedModel   HF dir, Flax model dir, run dir or hub id
  save_flax_model(cfg, params, output, ...)              Flax model directory (config.json + orbax params/)
  export_hf(cfg, params, output, ...) -> ExportReport    HF directory, checked against PyTorch
  export_model(source, output, step=None, ...)           load_model + export_hf
  hf_to_flax / flax_to_hf                                the name table of ``jaxdistil.hf.names``
"""

from jaxdistil.hf.export import ExportReport, export_hf, export_model, hf_config
from jaxdistil.hf.files import read_state_dict, write_state_dict
from jaxdistil.hf.load import LoadedModel, load_flax_dir, load_hf_dir, load_model, load_run, save_flax_model
from jaxdistil.hf.names import check_flax_params, flax_to_hf, hf_to_flax

__all__ = [
    "ExportReport", "LoadedModel", "check_flax_params", "export_hf", "export_model", "flax_to_hf",
    "hf_config",
    "hf_to_flax", "load_flax_dir", "load_hf_dir", "load_model", "load_run", "read_state_dict",
    "save_flax_model", "write_state_dict",
]
