"""The ``mednext demo``: real CT scans, fetched and cached, turned into an nnU-Net v2 raw dataset.

Importing this package is cheap; SimpleITK and numpy load when a function needs them.
"""

from mednext.demo.data import (
    DEFAULT_LABEL_GROUPS,
    DemoDataset,
    ExampleFiles,
    ExampleScansUnavailable,
    default_cache_dir,
    fetch_example_scans,
    prepare_demo_dataset,
    read_dicom_series,
    resample_label_to_image,
)

__all__ = [
    "DEFAULT_LABEL_GROUPS",
    "DemoDataset",
    "ExampleFiles",
    "ExampleScansUnavailable",
    "default_cache_dir",
    "fetch_example_scans",
    "prepare_demo_dataset",
    "read_dicom_series",
    "resample_label_to_image",
]
