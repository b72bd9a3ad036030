"""``ssl export`` and ``ssl inspect``: the backbone in safetensors, TorchScript, ONNX or hf form, checked."""
