"""FX graph passes of gna_flex (installed as ``gna_flex.passes``)."""
