"""The model: the ModernBERT backbone (built from a typed config or a pretrained checkpoint), its
tokenizer and special tokens, what a saved model folder is (`ModelInfo`, sampler defaults), and the
export of a self-contained `text-diffusion` folder."""

from .. import lazy_exports

_EXPORTS = {
    "build_model": "backbone", "count_parameters": "backbone", "logits_at": "backbone", "unwrap": "backbone",
    "load_tokenizer": "tokenizer", "special_token_ids": "tokenizer", "non_special_token_ids": "tokenizer",
    "ModelInfo": "info", "model_info_of": "info", "read_model_info": "info", "read_sampler_defaults": "info",
    "write_sampler_defaults": "info",
    "save_model_folder": "export",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
