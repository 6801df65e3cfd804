"""TrainStep (the one training step of hcd-distill and the benchmarks) against a hand-written update."""
import copy

import pytest
import timm
import torch

from hcd_fast import HCDConfig
from hcd_fast.distill import Distiller, DistillTask, TeacherTap, TrainStep, build_criterion, probe_student

K = 7


def build(method="hcd", backend="reference"):
    torch.manual_seed(0)
    student = timm.create_model("resnet10t", num_classes=K, channels=(8, 16, 32, 64), stem_width=8)
    teacher = TeacherTap(timm.create_model("vit_tiny_patch16_224", num_classes=K, img_size=16, patch_size=4,
                                           depth=1, embed_dim=16, num_heads=2))
    channels, _ = probe_student(student, 4, (3, 16, 16))
    crit = build_criterion(method, channels, 16, K, HCDConfig(num_sub_logits=3), backend=backend)
    distiller = Distiller(student, crit)
    task = DistillTask(distiller, teacher if method != "ce" else None).train()
    return task, torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9)


def batch(seed=1, b=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, K, (b,), generator=g)


@pytest.mark.parametrize("method", ["hcd", "kd", "ce"])
def test_step_equals_a_hand_written_update(method):
    task, opt = build(method)
    ref_task, ref_opt = copy.deepcopy(task), None
    ref_opt = torch.optim.SGD(ref_task.trainable_module.parameters(), lr=0.1, momentum=0.9)
    step = TrainStep(task, opt, clip_grad=1.0)
    for seed in (1, 2):
        x, y = batch(seed)
        out = step(x, y)
        result = ref_task(x, y)
        ref_opt.zero_grad(set_to_none=True)
        result["loss"].backward()
        torch.nn.utils.clip_grad_norm_(ref_task.trainable_module.parameters(), 1.0)
        ref_opt.step()
        want = torch.stack([result["loss"].double()] + [result[k].double() for k in step.part_names])
        torch.testing.assert_close(out.vals, want.detach(), rtol=0, atol=0)
        assert int(out.correct) == int((result["output"].argmax(-1) == y).sum())
        assert not out.skipped and out.loss is None and not bool(out.nonfinite)
    for p, q in zip(task.trainable_module.parameters(), ref_task.trainable_module.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_step_with_cached_teacher_features_skips_the_teacher_forward():
    task, opt = build("kd")
    x, y = batch()
    feat, _ = task.teacher(x)
    calls = []
    task.teacher.register_forward_hook(lambda *a: calls.append(1))
    online = TrainStep(copy.deepcopy(task), torch.optim.SGD(task.trainable_module.parameters(), lr=0.1))
    cached = TrainStep(task, opt)(x, y, cached_feat=feat)
    assert not calls
    torch.testing.assert_close(cached.vals, online(x, y).vals)


def test_published_style_configuration_syncs_the_loss_every_step():
    """Reference backend, fp16 autocast with a GradScaler, loss.item() every step: a configuration."""
    task, opt = build("hcd", backend="reference")
    step = TrainStep(task, opt, amp_dtype=torch.float16, scaler=torch.amp.GradScaler("cpu", init_scale=1.0),
                     sync_loss=True)
    before = [p.detach().clone() for p in task.trainable_module.parameters()]
    out = step(*batch())
    assert isinstance(out.loss, float) and out.loss == pytest.approx(float(out.vals[0]))
    assert any(not torch.equal(p, q) for p, q in zip(task.trainable_module.parameters(), before))


def test_skip_nonfinite_makes_no_update():
    task, opt = build("kd")
    seen = []
    step = TrainStep(task, opt, skip_nonfinite=True, reduce_max=lambda t: seen.append(t) or t)
    before = [p.detach().clone() for p in task.trainable_module.parameters()]
    x, y = batch()
    out = step(x * float("nan"), y)
    assert out.skipped and bool(out.nonfinite) and out.correct is None and len(seen) == 1
    for p, q in zip(task.trainable_module.parameters(), before):
        assert torch.equal(p, q)
