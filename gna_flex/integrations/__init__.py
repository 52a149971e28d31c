"""Integrations of gna_flex with model libraries.

Each integration is an optional extra and is imported explicitly, e.g.
``from gna_flex.integrations import diffusers as gna_diffusers`` (needs
``pip install gna_flex[diffusers]``). Importing this package imports nothing
optional.
"""
