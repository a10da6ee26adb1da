"""mim-scale: distributed MiM (Mask in Mask) pre-training for 3D CT."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import mim_scale` (and the CLI's --help) does not import torch.
    if name in ("load_encoder", "load_encoder_weights"):  # the loading API, below the engine
        from mim_scale.model import io

        return getattr(io, name)
    if name == "export_run":
        from mim_scale import export

        return export.export_run
    if name == "load_bundle_network":  # a MONAI bundle from `mim-scale export --format monai-bundle`
        from mim_scale import monai_bundle

        return monai_bundle.load_bundle_network
    if name == "list_exports":  # the exports under a folder or an s3:// prefix (`mim-scale models list`)
        from mim_scale import catalogue

        return catalogue.catalogue
    raise AttributeError(f"module 'mim_scale' has no attribute {name!r}")
