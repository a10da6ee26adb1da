"""Named reasons an input is not built, and the exception that carries one.

Reasons are short stable codes: they are counted in the public build report and in the
``mim_shards_volumes_rejected_total{reason}`` metric, so they never embed anything from the input.
The free-text ``detail`` (which may name files or tag values) goes only to the private ``rejects.jsonl``.
"""

from __future__ import annotations

REASONS: dict[str, str] = {
    # file level
    "unreadable": "the file could not be opened or read (permission, I/O error)",
    "empty_file": "zero-byte file",
    "not_dicom": "not a DICOM file (no DICM preamble, not parseable)",
    "truncated": "file ends before its declared content",
    "not_image": "DICOM object without pixel data (report, DICOMDIR, structured object)",
    "missing_pixel_data": "image object whose PixelData is absent",
    "pixel_decode_failed": "pixel data could not be decoded (bad BitsAllocated, corrupt codec stream, ...)",
    "missing_geometry": "ImagePositionPatient / ImageOrientationPatient / PixelSpacing missing or malformed",
    "not_grayscale": "SamplesPerPixel is not 1",
    # DICOM screening (PS3.15: clean pixel data or exclusion); each has a build option that allows it
    "non_ct_sop_class": "SOP class is neither CT Image Storage nor Enhanced CT Image Storage (secondary capture, "
                        "...): allow with --allow-non-ct-sop-class / allow_non_ct_sop_class",
    "burned_in_annotation": "BurnedInAnnotation is YES (identifying text may be in the pixels): allow with "
                            "--allow-burned-in-annotation / allow_burned_in_annotation",
    "derived_image": "ImageType is DERIVED or SECONDARY (reformat, screen capture, computed map): allow with "
                     "--allow-derived / allow_derived",
    "unsupported_format": "not a format the builder reads (DICOM, NIfTI, MetaImage, NRRD), or a variant of one it does not take",
    "bad_header": "MetaImage / NRRD header malformed, or longer than the header bound",
    "unsupported_data_type": "voxel type the readers do not take (unknown element type, vectors, complex)",
    "unsafe_data_file": "a header names a data file outside its own folder (absolute path, '..', a link leading out)",
    "missing_data_file": "the data file a MetaImage / NRRD header names is absent",
    # collection recipes (mim_scale.shards.recipes)
    "label_map": "segmentation / label volume in a collection's tree: skipped by its recipe",
    "annotation": "annotation, metadata or script file in a collection's tree (XML, CSV, JSON, ...): skipped",
    "outside_recipe": "file where the collection's recipe expects none: that part of the layout does not match",
    # series level
    "non_ct_modality": "modality is not CT (MR, SEG, PT, ...): reported, not built",
    "localizer": "localizer / scout image",
    "enhanced_multiframe_unsupported": "enhanced multi-frame object without usable per-frame geometry",
    "too_few_slices": "fewer slices than min_slices",
    "mixed_orientations": "slices of one series have different orientations",
    "mixed_dimensions": "slices of one series differ in rows, columns or pixel spacing",
    "duplicate_positions": "two or more slices at the same position along the slice normal",
    "missing_slices": "gap between slice positions: slices are missing",
    "irregular_spacing": "slice spacing varies beyond the tolerance",
    "gantry_tilt": "slice positions do not follow the slice normal (tilted gantry)",
    "ambiguous_orientation": "array axes are near 45 degrees to the patient axes",
    "absurd_spacing": "voxel spacing is non-positive, non-finite or implausibly large",
    "too_large": "declared, inflated or resampled size needs more memory than a builder worker may use "
                 "(--worker-memory / worker_memory_bytes)",
    "too_small": "volume smaller than the minimum extent after resampling",
    "sheared_affine": "NIfTI affine is sheared / singular",
    "invalid_header": "NIfTI header field out of range: dim, datatype/bitpix, vox_offset, qfac, quaternion, units "
                      "or scaling (the field is named in the detail)",
    "missing_orientation": "NIfTI qform_code and sform_code are both 0 (or out of range): no patient orientation",
    "inconsistent_geometry": "NIfTI qform and sform disagree, or pixdim disagrees with the affine",
    "not_3d": "image is not a 3D volume (2D, or a 4D series with more than one frame)",
    "non_finite_values": "NaN or Inf voxels",
    "not_ct_intensity": "no voxel below -200 HU: not a CT in HU (a label map, MR, or normalised data)",
    "read_failed": "the reader failed for another reason (detail in rejects.jsonl)",
    # build level
    "duplicate_content": "the built volume is identical to one already in this build",
    "duplicate_series": "the same scan (SeriesInstanceUID) as a volume of another collection in this build",
    "excluded": "listed in --exclude (content hash or source key)",
}


class InputRejected(Exception):
    """An input that is not built: ``reason`` is a code from REASONS, ``detail`` is private free text."""

    def __init__(self, reason: str, detail: str = "", source: str | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        self.reason = reason
        self.detail = detail
        self.source = source
        super().__init__(f"{reason}: {detail}" if detail else reason)
