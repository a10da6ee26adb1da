"""Fixtures for the ops tests: the real sample CT as a [0, 1] volume to cut crops from.

The Triton kernels run on CPU tensors through Triton's interpreter, chosen per call by
``mim_scale.ops._triton.Kernels`` (it jits each kernel with ``TRITON_INTERPRET=1`` set just for that),
so nothing here has to set the environment before triton is imported, and other test folders in the
same pytest process are unaffected.
"""

from __future__ import annotations

import pytest
import torch

from mim_scale.ops import parity


@pytest.fixture(scope="session")
def ct_source(ct_dir) -> torch.Tensor:
    """(D, H, W) float32 in [0, 1]: abdomen_pelvis_ct.nii.gz, HU window [-1000, 1000]."""
    return parity.load_ct_source(ct_dir / "abdomen_pelvis_ct.nii.gz")

