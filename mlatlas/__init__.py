"""mlatlas: modern ML methods implemented from their equations and verified three ways."""

__version__ = "0.2.0"
