from ssl_cli.losses.barlow import BarlowTwinsLoss, cross_correlation
from ssl_cli.losses.byol import normalized_mse
from ssl_cli.losses.instdisc import MemoryBank, nce_loss
from ssl_cli.losses.invaspread import invaspread_loss
from ssl_cli.losses.moco import KeyQueue, moco_contrastive, moco_logits, positive_first_cross_entropy
from ssl_cli.losses.ntxent import NTXentLoss
from ssl_cli.losses.simsiam import negative_cosine, normalized_std, simsiam_loss

__all__ = [
    "BarlowTwinsLoss",
    "KeyQueue",
    "MemoryBank",
    "NTXentLoss",
    "cross_correlation",
    "invaspread_loss",
    "moco_contrastive",
    "moco_logits",
    "nce_loss",
    "negative_cosine",
    "normalized_mse",
    "normalized_std",
    "positive_first_cross_entropy",
    "simsiam_loss",
]
