"""Face data: robust image loading, person-folder datasets, splits, transforms, downloads.

Downloads live in facetag.data.fetch (`from facetag.data.fetch import fetch`); the function
is not re-exported here, where its name would hide the module from mock.patch and friends.
"""

from facetag.data.folders import (
    FaceDataset,
    FaceFolder,
    FolderInfo,
    Sample,
    Split,
    content_hash,
    format_info,
    info,
    parse_split,
    scan_folder,
    split,
)
from facetag.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    find_images,
    image_size,
    is_image_file,
    load_image,
)
from facetag.data.transforms import (
    AugmentConfig,
    affine_batch,
    augment_batch,
    fit_image,
    normalize,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "AugmentConfig",
    "FaceDataset",
    "FaceFolder",
    "FolderInfo",
    "Sample",
    "Split",
    "affine_batch",
    "augment_batch",
    "content_hash",
    "find_images",
    "fit_image",
    "format_info",
    "image_size",
    "info",
    "is_image_file",
    "load_image",
    "normalize",
    "parse_split",
    "scan_folder",
    "split",
]
