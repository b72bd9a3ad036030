"""Files ``ssl`` writes and reads back: safetensors I/O, training checkpoints, ``load_backbone``."""
