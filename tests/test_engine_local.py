import torch
from torch import nn

from sid_fast.config import OptimConfig
from sid_fast.engine import EMA, LocalEngine


def _engine(accum):
    torch.manual_seed(0)
    nets = [nn.Linear(3, 3) for _ in range(3)]
    return LocalEngine(*nets, OptimConfig(lr_generator=0.1, lr_fake=0.1), grad_accum=accum, ema_decay=0.9)


def test_accumulation_equals_one_big_batch():
    x = torch.randn(8, 3)
    big, acc = _engine(1), _engine(2)
    big.backward("generator", big.generator(x).pow(2).sum(1).mean())
    assert big.step("generator")
    for half in (x[:4], x[4:]):
        acc.backward("generator", acc.generator(half).pow(2).sum(1).mean())
        stats = acc.step("generator")
    assert stats and acc.updates["generator"] == 1 and acc.micro_steps["generator"] == 2
    for a, b in zip(big.generator.parameters(), acc.generator.parameters()):
        torch.testing.assert_close(a, b)


def test_first_micro_step_does_not_update():
    engine = _engine(2)
    before = [p.clone() for p in engine.fake_score.parameters()]
    engine.backward("fake_score", engine.fake_score(torch.randn(4, 3)).sum())
    assert engine.step("fake_score") == {}
    assert all(torch.equal(a, b) for a, b in zip(before, engine.fake_score.parameters()))


def test_teacher_is_frozen_and_frozen_context_restores():
    engine = _engine(1)
    assert not any(p.requires_grad for p in engine.teacher.parameters())
    with engine.frozen("fake_score"):
        assert not any(p.requires_grad for p in engine.fake_score.parameters())
    assert all(p.requires_grad for p in engine.fake_score.parameters())


def test_ema_warmup_schedule():
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = EMA(module, 0.999)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update(module)  # decay min(0.999, 1/10) = 0.1 -> shadow 0.9
    torch.testing.assert_close(ema.shadow["weight"], torch.tensor([[0.9]]))
    ema.update(module)  # decay 2/11
    torch.testing.assert_close(ema.shadow["weight"], torch.tensor([[0.9 + 0.1 * (1 - 2 / 11)]]))
