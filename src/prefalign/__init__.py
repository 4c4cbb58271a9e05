"""prefalign: align diffusion models with human preference."""

__version__ = "0.1.0"
