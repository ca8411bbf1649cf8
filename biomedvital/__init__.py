"""BioMed-VITAL suite: clinician-aligned visual instruction data for biomedical LLaVA models."""

__version__ = "0.1.0"
