import torch

torch.set_flush_denormal(True)
