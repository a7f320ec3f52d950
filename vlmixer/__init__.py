"""vlmixer: command-line front door to the pipeline, trainer and storage packages."""
