"""mim-scale: distributed MiM (Mask in Mask) pre-training for 3D CT."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import mim_scale` (and the CLI's --help) does not import torch.
    if name in ("load_encoder", "load_encoder_weights", "export_run"):
        from mim_scale import export

        return getattr(export, name)
    raise AttributeError(f"module 'mim_scale' has no attribute {name!r}")
