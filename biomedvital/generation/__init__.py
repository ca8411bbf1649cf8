"""Stage 1 and 2 of the pipeline: generate candidates and rate them with chat models.

Modules are imported on use (``biomedvital.generation.generate`` …) so that importing the
package does not pull in the ``openai`` client.
"""
