"""ml_collections configs: ``base.py`` holds every default; one file per objective family."""
