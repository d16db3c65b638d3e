"""The same numbers on CUDA as on CPU (skipped without a GPU)."""

import pytest
import torch

from erpo_mega.algo import ERPOConfig, LossConfig, LossNormalizer, erpo_token_advantages, policy_loss


@pytest.mark.gpu
def test_erpo_and_loss_on_cuda_match_cpu():
    torch.manual_seed(0)
    n, t = 32, 40
    r = torch.randint(0, 2, (n,)).double()
    g = torch.arange(n) % 5  # non-contiguous groups
    h = torch.rand(n, t, dtype=torch.float64) * 3
    mask = torch.arange(t)[None] < torch.randint(1, t + 1, (n,))[:, None]
    cpu, cpu_stats = erpo_token_advantages(r, h, mask, g, ERPOConfig(num_buckets=4))
    gpu, gpu_stats = erpo_token_advantages(r.cuda(), h.cuda(), mask.cuda(), g.cuda(), ERPOConfig(num_buckets=4))
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-10)
    assert gpu_stats["cdp_fraction"] == pytest.approx(cpu_stats["cdp_fraction"])

    old = -torch.rand(n, t, dtype=torch.float64)
    logp = old + 0.1 * torch.randn(n, t, dtype=torch.float64)
    cfg = LossConfig(kl_coef=0.1, dual_clip_c=3.0, tis_cap=2.0, aggregation="seq-mean-token-mean")
    norm = LossNormalizer.from_mask(mask)
    results = []
    for dev in ("cpu", "cuda"):
        lp = logp.to(dev).requires_grad_(True)
        loss, metrics = policy_loss(lp, old.to(dev), cpu.to(dev), mask.to(dev), cfg, normalizer=norm,
                                    ref_logp=old.to(dev), rollout_logp=old.to(dev) - 0.05)
        loss.backward()
        results.append((loss.item(), lp.grad.cpu(), {k: v.item() for k, v in metrics.items()}))
    (l_cpu, g_cpu, m_cpu), (l_gpu, g_gpu, m_gpu) = results
    assert l_gpu == pytest.approx(l_cpu, rel=1e-10)
    assert torch.allclose(g_gpu, g_cpu, atol=1e-12)
    assert m_gpu == pytest.approx(m_cpu, rel=1e-9, abs=1e-12)
