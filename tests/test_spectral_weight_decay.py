"""DecoupledWeightDecayTracker against a literal, hand-written AdamW."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from grokedge.edge.selection import slice_bounds
from grokedge.edge.weight_decay import DecoupledWeightDecayTracker

STEPS = 6
LR = 0.05
DECAY = 0.5
BETAS = (0.9, 0.98)
EPS = 1e-8
TOL = 1e-6


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.unused = nn.Linear(2, 2)  # never receives a gradient: AdamW skips it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def schedule(step: int) -> float:
    return 1.0 / (1.0 + 0.3 * step)


def setup(decoupled: str = "adamw"):
    torch.manual_seed(0)
    model = Tiny().double()
    named = dict(model.named_parameters())
    decayed = [named[n] for n in ("fc1.weight", "fc2.weight", "unused.weight")]
    free = [named[n] for n in ("fc1.bias", "fc2.bias", "unused.bias")]
    groups = [{"params": decayed, "weight_decay": DECAY}, {"params": free, "weight_decay": 0.0}]
    if decoupled == "adamw":
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    else:
        opt = torch.optim.Adam(groups, lr=LR, betas=BETAS, eps=EPS, decoupled_weight_decay=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return model, opt, sched


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in sorted(tensors)])


class HandAdamW:
    """Literal AdamW: θ ← θ(1 − ηω); m, v moments; bias correction; eps outside the sqrt."""

    def __init__(self) -> None:
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.t = 0

    def step(self, theta, grads, lrs, decays):
        """Returns (θ_after, wd part, adam part) as dicts by name."""
        self.t += 1
        after, wd, adam = {}, {}, {}
        b1, b2 = BETAS
        for name, th in theta.items():
            g = grads[name]
            if g is None:  # skipped by the optimizer
                after[name], wd[name], adam[name] = th, torch.zeros_like(th), torch.zeros_like(th)
                continue
            lr, decay = lrs[name], decays[name]
            m = self.m[name] = b1 * self.m.get(name, torch.zeros_like(th)) + (1 - b1) * g
            v = self.v[name] = b2 * self.v.get(name, torch.zeros_like(th)) + (1 - b2) * g * g
            m_hat_scale = lr / (1 - b1**self.t)
            denom = v.sqrt() / math.sqrt(1 - b2**self.t) + EPS
            adam[name] = -m_hat_scale * m / denom
            wd[name] = -lr * decay * th
            after[name] = th * (1 - lr * decay) + adam[name]
        return after, wd, adam


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run(mode: str, decoupled: str = "adamw"):
    """Train STEPS steps; returns the errors of the tracker against the hand AdamW."""
    model, opt, sched = setup(decoupled)
    tracker = DecoupledWeightDecayTracker(opt, model.named_parameters())
    handle = tracker.register() if mode != "manual" else None
    gen = torch.Generator().manual_seed(1)
    hand = HandAdamW()
    start = snapshot(model)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    hand_wd = {n: torch.zeros_like(t) for n, t in start.items()}
    hand_adam = {n: torch.zeros_like(t) for n, t in start.items()}
    step_err = 0.0
    for _ in range(STEPS):
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(8, 3, generator=gen, dtype=torch.float64)

        def closure(model=model, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        theta = snapshot(model)
        lrs = {n: group_of[id(p)]["lr"] for n, p in model.named_parameters()}
        decays = {n: group_of[id(p)]["weight_decay"] for n, p in model.named_parameters()}
        if mode.startswith("hook_closure"):
            # Lightning's pattern: gradients only exist once step() runs the closure.
            opt.zero_grad(set_to_none=True)
            if mode == "hook_closure_kw":
                opt.step(closure=closure)
            else:
                opt.step(closure)
        else:
            closure()
            if mode == "manual":
                tracker.record_step()
            opt.step()
        grads = {n: p.grad for n, p in model.named_parameters()}
        after, wd, adam = hand.step(theta, grads, lrs, decays)
        for n in theta:
            hand_wd[n] += wd[n]
            hand_adam[n] += adam[n]
        step_err = max(step_err, float((flat(after) - flat(snapshot(model))).abs().max()))
        sched.step()
    assert len({g["lr"] for g in opt.param_groups}) == 1 and opt.param_groups[0]["lr"] != LR
    if handle is not None:
        handle.remove()
    total = flat(snapshot(model)) - flat(start)
    wd = tracker.take()
    return {
        "step": step_err,
        "wd": float((wd - flat(hand_wd)).abs().max()),
        "grad": float((total - wd - flat(hand_adam)).abs().max()),
        "wd_norm": float(wd.norm()),
        "tracker": tracker,
        "wd_vec": wd,
    }


@pytest.mark.parametrize("mode", ["manual", "hook", "hook_closure", "hook_closure_kw"])
def test_wd_part_matches_hand_adamw_with_two_groups_and_scheduler(mode):
    errors = run(mode)
    assert errors["step"] <= TOL  # the hand AdamW is the real AdamW
    assert errors["wd"] <= TOL  # tracker = Σ_t −η_t ω_g θ_t
    assert errors["grad"] <= TOL  # total − wd = Σ_t Adam update
    assert errors["wd_norm"] > 1e-3  # the check is not vacuous
    assert errors["tracker"].steps == 0  # take() resets
    assert torch.equal(errors["tracker"].take(), torch.zeros_like(errors["wd_vec"]))


def test_removed_hook_stops_recording():
    model, opt, _ = setup()
    tracker = DecoupledWeightDecayTracker(opt, model.named_parameters())
    handle = tracker.register()
    model(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    assert tracker.steps == 1 and float(tracker.take().abs().sum()) > 0
    handle.remove()
    opt.step()
    assert tracker.steps == 0 and float(tracker.take().abs().sum()) == 0


def test_adam_with_decoupled_flag_is_exact():
    errors = run("manual", decoupled="adam")
    assert max(errors["step"], errors["wd"], errors["grad"]) <= TOL


def test_skipped_and_undecayed_parameters_record_zero():
    wd = run("hook_closure")["wd_vec"]
    model, _, _ = setup()
    names = sorted(n for n, _ in model.named_parameters())
    offsets, off = {}, 0
    for n, p in sorted(model.named_parameters()):
        offsets[n] = (off, off + p.numel())
        off += p.numel()
    for n in names:
        a, b = offsets[n]
        zero = n.startswith("unused") or n.endswith("bias")
        assert bool((wd[a:b] == 0).all()) == zero, n


def test_inexact_optimizers_raise_or_warn_once():
    model = Tiny()
    with pytest.raises(ValueError, match="not decoupled.*allow_inexact"):
        DecoupledWeightDecayTracker(
            torch.optim.Adam(model.parameters(), weight_decay=0.1), model.named_parameters()
        )
    with pytest.raises(ValueError, match="SGD"):
        DecoupledWeightDecayTracker(
            torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1), model.named_parameters()
        )
    # no decay at all: trivially exact
    DecoupledWeightDecayTracker(torch.optim.Adam(model.parameters()), model.named_parameters())

    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    with pytest.warns(UserWarning, match="recording zeros"):
        tracker = DecoupledWeightDecayTracker(opt, model.named_parameters(), allow_inexact=True)
    model(torch.randn(3, 4)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already
        tracker.record_step()
    assert torch.equal(tracker.take(), torch.zeros(sum(p.numel() for p in model.parameters())))


def test_parameter_outside_the_optimizer_is_an_error():
    model = Tiny()
    opt = torch.optim.AdamW(model.fc1.parameters())
    with pytest.raises(ValueError, match="fc2.weight"):
        DecoupledWeightDecayTracker(opt, model.named_parameters())
    for param in (*model.fc2.parameters(), *model.unused.parameters()):
        param.requires_grad_(False)  # frozen and outside the optimizer: fine, WD part zero
    tracker = DecoupledWeightDecayTracker(opt, model.named_parameters())
    model(torch.randn(3, 4)).sum().backward()
    tracker.record_step()
    wd = tracker.take()
    n_fc1 = sum(p.numel() for p in model.fc1.parameters())  # fc1.* sort first
    assert bool((wd[:n_fc1] != 0).all()) and bool((wd[n_fc1:] == 0).all())


@pytest.mark.parametrize("world_size", [2, 3])
def test_slices_accumulate_their_part_of_the_whole(world_size):
    model, opt, _ = setup()
    whole = DecoupledWeightDecayTracker(opt, model.named_parameters())
    p = whole.p_total
    bounds = [slice_bounds(p, r, world_size) for r in range(world_size)]
    parts = [
        DecoupledWeightDecayTracker(opt, model.named_parameters(), start=a, stop=b)
        for a, b in bounds
    ]
    model(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    for tracker in (whole, *parts):
        tracker.record_step()
    opt.step()
    assert torch.equal(torch.cat([t.take() for t in parts]), whole.take())


def test_state_dict_round_trip_reproduces_identical_accumulation():
    model, opt, sched = setup()
    first = DecoupledWeightDecayTracker(opt, model.named_parameters())
    second = DecoupledWeightDecayTracker(opt, model.named_parameters())
    gen = torch.Generator().manual_seed(2)
    for step in range(STEPS):
        if step == STEPS // 2:
            blob = io.BytesIO()
            torch.save(first.state_dict(), blob)
            blob.seek(0)
            second.load_state_dict(torch.load(blob, weights_only=True))
        opt.zero_grad(set_to_none=True)
        model(torch.randn(5, 4, generator=gen, dtype=torch.float64)).sum().backward()
        first.record_step()
        if step >= STEPS // 2:
            second.record_step()
        opt.step()
        sched.step()
    assert second.steps == first.steps == STEPS
    assert torch.equal(first.take(), second.take())
