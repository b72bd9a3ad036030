from ssl_cli.data.images import ImageSet, decode_image
from ssl_cli.data.sources import open_dataset, scan_folder

__all__ = ["ImageSet", "decode_image", "open_dataset", "scan_folder"]
