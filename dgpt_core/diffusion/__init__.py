"""The training objective: the collator that masks and edits a batch (MDLM masking, Seed Diffusion
swaps and spurious insertions, the curriculum), the ELBO-weighted loss, and the repeatable ELBO
bound used for validation and perplexity."""

from .. import lazy_exports

_EXPORTS = {
    "IGNORE_INDEX": "collator", "DiffusionCollator": "collator", "EditState": "collator", "edit_state": "collator",
    "LossParts": "loss", "diffusion_loss": "loss", "token_nll": "loss",
    "Row": "elbo", "elbo_nll": "elbo", "elbo_per_token": "elbo", "stable_seed": "elbo",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
