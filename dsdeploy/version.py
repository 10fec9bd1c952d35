"""The package version, defined once (``dsdeploy.__version__`` re-exports it; modules import it from here)."""

__version__ = "0.1.0"
