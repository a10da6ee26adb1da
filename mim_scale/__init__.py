"""mim-scale: distributed MiM (Mask in Mask) pre-training for 3D CT."""

__version__ = "0.1.0"
