"""Figures stage: ``fetch-figures`` downloads the PMC figures of LLaVA-Med's URL lists (a verb
that logs an MLflow run, so it lives apart from ``data/``, which imports no other package)."""
