from ssl_cli.losses.moco import KeyQueue, moco_contrastive
from ssl_cli.losses.ntxent import NTXentLoss

__all__ = ["KeyQueue", "NTXentLoss", "moco_contrastive"]
