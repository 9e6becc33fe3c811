"""Training checkpoints (python/qlora_ext/checkpoint.py): safetensors + JSON only, exact round
trips of the optimizer, scheduler and every RNG, no code run on load, clear errors for corrupt
files, fallback to the previous checkpoint, and an intact previous one after a failed write."""

import errno
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora_ext.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    resume,
    save_checkpoint,
)
from qlora_ext.optim import PagedAdamW8bit

pytest.importorskip("safetensors")


def setup(opt_cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.Linear(400, 3))
    model[0].weight.requires_grad_(False)  # a frozen base, as in QLoRA
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt_cls(params, lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train(model, opt, sched, steps):
    for _ in range(steps):
        loss = model(torch.randn(8, 300)).square().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def flat(sd):
    """state_dict leaves in order, tensors as tensors."""
    if isinstance(sd, dict):
        return [x for k in sorted(sd, key=str) for x in [str(k), *flat(sd[k])]]
    if isinstance(sd, (list, tuple)):
        return [x for v in sd for x in flat(v)]
    return [sd]


def same(a, b):
    fa, fb = flat(a), flat(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb, strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y and type(x) is type(y), (x, y)


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, PagedAdamW8bit], ids=lambda c: c.__name__)
def test_round_trip_is_exact(opt_cls, tmp_path):
    model, opt, sched = setup(opt_cls)
    train(model, opt, sched, 3)
    random.seed(5)
    np.random.seed(6)
    history = {"loss": [1.5, 1.25], "step": [1, 2]}
    path = save_checkpoint(tmp_path, 3, model, opt, sched, history, before={"loss": 2.0})
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE",
        "state.json",
        "tensors.safetensors",
    ]
    expected_rng = (torch.rand(4), random.random(), np.random.rand())
    expected_next = [p.detach().clone() for p in model.parameters()]

    model2, opt2, sched2 = setup(opt_cls)  # a fresh run, other RNG states
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    step, hist, before = load_checkpoint(path, model2, opt2, sched2)
    assert (step, hist, before) == (3, history, {"loss": 2.0})
    assert (torch.rand(4), random.random(), np.random.rand())[1:] == expected_rng[1:]
    for a, b in zip(model2.parameters(), expected_next, strict=True):
        assert torch.equal(a, b)
    same(opt2.state_dict(), opt.state_dict())
    same(sched2.state_dict(), sched.state_dict())
    # And training on from both gives the same bits.
    torch.manual_seed(9)
    train(model, opt, sched, 2)
    torch.manual_seed(9)
    train(model2, opt2, sched2, 2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


class _Payload:
    """Unpickling this creates a file: proof that a loader ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_malicious_pickle_is_never_loaded(tmp_path):
    model, opt, sched = setup(torch.optim.AdamW)
    marker = tmp_path / "pwned"
    # An old-style checkpoint whose state file is a pickle with a payload.
    old = tmp_path / "run" / "checkpoints" / "step_000002"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(pickle.dumps(_Payload(marker)))
    (old / "COMPLETE").write_text("2")
    with pytest.raises(CheckpointError, match="older qlora_ext"):
        load_checkpoint(old, model, opt, sched)
    # A pickle where the safetensors file should be.
    path = save_checkpoint(tmp_path / "run2", 1, model, opt, sched, {})
    (path / "tensors.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="tensors.safetensors: unreadable"):
        load_checkpoint(path, model, opt, sched)
    assert not marker.exists()
    # Sanity: the payload does run when something unpickles it.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda p: (p / "state.json").write_text('{"step": 3, "histo'), "state.json: not valid"),
        (lambda p: (p / "state.json").write_text("[1, 2]"), "state.json: not a qlora_ext"),
        (lambda p: (p / "state.json").unlink(), "state.json: missing"),
        (
            lambda p: (p / "tensors.safetensors").write_bytes(
                (p / "tensors.safetensors").read_bytes()[:200]
            ),
            "tensors.safetensors: unreadable",
        ),
    ],
    ids=["truncated-json", "wrong-json", "missing-json", "truncated-tensors"],
)
def test_corrupt_checkpoints_name_the_file(corrupt, match, tmp_path):
    model, opt, sched = setup(torch.optim.AdamW)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {})
    corrupt(path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, model, opt, sched)


def test_another_models_checkpoint_is_refused(tmp_path):
    model, opt, sched = setup(torch.optim.AdamW)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {})
    other = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.Linear(400, 4))
    other[0].weight.requires_grad_(False)
    opt2 = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad])
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0)
    with pytest.raises(
        CheckpointError, match=r"1\.(weight|bias) is torch.float32 \(3\b.*, the model has"
    ):
        load_checkpoint(path, other, opt2, sched2)


def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path):
    model, opt, sched = setup(torch.optim.AdamW)
    train(model, opt, sched, 1)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"loss": [1.0]})
    train(model, opt, sched, 1)
    newest = save_checkpoint(tmp_path, 2, model, opt, sched, {"loss": [1.0, 0.5]})
    (newest / "tensors.safetensors").write_bytes(b"\x00" * 64)
    logged = []
    with pytest.warns(UserWarning, match="step_000002"):
        path, step, hist, _ = resume(tmp_path, *setup(torch.optim.AdamW), logged.append)
    assert (path.name, step, hist) == ("step_000001", 1, {"loss": [1.0]})
    assert "skipping a corrupt checkpoint" in logged[0]
    (path / "state.json").write_text("garbage")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"), pytest.warns():
        resume(tmp_path, *setup(torch.optim.AdamW), logged.append)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    model, opt, sched = setup(torch.optim.AdamW)
    good = save_checkpoint(tmp_path, 1, model, opt, sched, {"loss": [1.0]})
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {"loss": [1.0, 0.5]}, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert latest_checkpoint(tmp_path) == good
    assert json.loads((good / "state.json").read_text())["step"] == 1
