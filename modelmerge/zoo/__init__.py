"""Built-in architectures, datasets and vectorised zoo training."""
