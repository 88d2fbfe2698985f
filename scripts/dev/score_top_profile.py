"""One launch of the fused score + top-m kernel on one 8B layer's keys (for ncu): PYTHONPATH=python ncu ... python3 scripts/dev/score_top_profile.py"""
import torch

from retrieval_attention.index import exact_key_knn

g = torch.Generator(device="cuda").manual_seed(0)
n = 32768
drift = torch.linspace(0, 1, n, device="cuda").view(1, n, 1) * torch.randn((2, 1, 128), device="cuda", generator=g)
keys = (torch.randn((2, n, 128), device="cuda", generator=g) + 3 * drift + 2).bfloat16()
exact_key_knn(keys, 16, column_stride=2)
torch.cuda.synchronize()
